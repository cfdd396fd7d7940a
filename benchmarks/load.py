"""Load figures (not a test): N concurrent light edges upload one increment each in ONE round.

    .venv/bin/python -m benchmarks.load [--edges 200] [--floats 3400000] [--short] [--json FILE]
                                        [--stagger S] [--long-poll S] [--max-workers N] ...

A real aggregator runs as a child process (mutual TLS on 127.0.0.1, a fresh PKI with one
certificate per edge, quorum = edges, one round). The edges are threads in a few client
processes, each edge with its own channel (one TLS connection each). Uploads are encoded once per
client process (a few distinct increments, kept as serialized messages; only the header differs
per edge), so an edge costs little more than TLS and HTTP/2. Every edge joins and downloads the
state, waits for all the others, then all upload at once (or spread over --stagger seconds), and
then long-poll Join until the federation says FINISHED, as edge_agent does. Every call retries
RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED with capped exponential backoff and full
jitter (fedocr.retry).

Figures: round time (first Join to the last receipt), ingest rate, the aggregator's peak RSS
(sampled every 50 ms with its children), failures by status code, retries, CPU seconds of the
aggregator and the clients, and whether the final global state equals the FedAvg of the uploads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from aggregator.config import SECTIONS, AggregatorConfig
from fedocr import pki, retry, tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

# About FedOCR-Hash_1/4's flat state (`recognizer info --preset fedocr --gamma 1/4`: 3,423,304 float32
# with BN today); the figure benchmarks.aggregator uses, so the two compare.
DEFAULT_FLOATS = 3_400_000
DEFAULT_EDGES = 200
SHORT_EDGES, SHORT_FLOATS = 20, 200_000
FINGERPRINT = b"\x6c" * 32
UPLOAD_METHOD = "/fedocr.v1.Federation/UploadIncrement"
CHUNK_ELEMS = 65536  # what edge_agent sends: 256 KiB of float32 per chunk
RPC_TIMEOUT_S = 120.0  # edge_agent's per-call deadline
SAMPLE_PERIOD_S = 0.05
SEED = 20260
MB, MIB = 1e6, float(1 << 20)
COMPRESSIONS = {"zstd": pb.COMPRESSION_ZSTD, "none": pb.COMPRESSION_NONE}


def samples_of(edge: int) -> int:
    """The sample count edge number `edge` reports (varied, so FedAvg weights differ)."""
    return 100 + 150 * (edge % 5)


def increment(kind: int, floats: int) -> np.ndarray:
    """Distinct increment number `kind` (the same in every process: seeded)."""
    return np.random.default_rng(SEED + kind).normal(0.0, 1e-3, floats).astype(np.float32)


def edge_name(edge: int) -> str:
    """Certificate name of edge number `edge`."""
    return f"edge-{edge:04d}"


def expected_state(edges: int, floats: int, distinct: int) -> np.ndarray:
    """FedAvg of round 1 from G_0 = 0: sum_j s_j * dW_j / sum_j s_j, as float32."""
    weights = [0.0] * distinct
    for j in range(edges):
        weights[j % distinct] += samples_of(j)
    total = np.zeros(floats, dtype=np.float64)
    for kind, w in enumerate(weights):
        if w:
            total += w * increment(kind, floats).astype(np.float64)
    return (total / sum(weights)).astype(np.float32)


# -- client processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What one client process needs: the aggregator, its edges and the increments to make."""

    index: int
    port: int
    pki_dir: str
    edges: tuple[int, ...]
    floats: int
    distinct: int
    compression: int
    zstd_level: int
    long_poll_s: int
    stagger_s: float
    edge_count: int


@dataclass
class EdgeRecord:
    """One edge's timeline (time.monotonic, shared by the processes) and outcome."""

    edge: int
    join_start: float = 0.0
    upload_start: float = 0.0
    upload_end: float = 0.0
    uploaded: bool = False  # the aggregator acknowledged the upload
    finished_at: float = 0.0  # a long-poll Join answered FINISHED
    stage: str = "join"  # where it stopped: join, download, upload, long-poll, done
    code: str | None = None  # the failure's status code (or exception type); None when counted
    details: str = ""
    retries: list[str] = field(default_factory=list)  # status code of each retried attempt
    message_bytes: int = 0
    receipt_wire_bytes: int = 0
    receipt_state: str = ""


def encode(kind: int, spec: WorkerSpec) -> tuple[list[bytes], int]:
    """Serialized chunk and trailer messages of increment `kind`, and their protobuf bytes."""
    enc = tensors.ChunkEncoder(
        [increment(kind, spec.floats)],
        pb.ENCODING_FLOAT32,
        spec.compression,
        level=spec.zstd_level,
        chunk_elems=CHUNK_ELEMS,
        ids=[0],
    )
    body = [pb.UploadMessage(chunk=c).SerializeToString() for c in enc.chunks()]
    body.append(pb.UploadMessage(trailer=enc.trailer()).SerializeToString())
    return body, sum(len(m) for m in body)


def manifest(floats: int) -> pb.Manifest:
    """The one-tensor manifest every edge sends (DESIGN 2: one flat shuffled vector)."""
    return pb.Manifest(tensors=[pb.TensorSpec(id=0, length=floats)], fingerprint=FINGERPRINT)


def run_edge(
    spec: WorkerSpec,
    record: EdgeRecord,
    channel: grpc.Channel,
    bodies: dict[int, tuple[list[bytes], int]],
    ready: threading.Barrier,
    go: threading.Event,
) -> None:
    """Join, download, wait for `go`, upload, long-poll Join until FINISHED; fills `record`, never raises.

    Every call retries UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED with backoff.
    """
    stub = pb_grpc.FederationStub(channel)
    upload = channel.stream_unary(
        UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadReceipt.FromString
    )
    policy = retry.RetryPolicy(
        base_delay=0.5, max_delay=30.0, max_attempts=None, max_elapsed=600.0, retry_resource_exhausted=True
    )
    invoker = retry.RetryInvoker(policy, on_retry=lambda event: record.retries.append(event.code.name))
    at_barrier = False
    try:
        record.join_start = time.monotonic()
        reply = invoker.call(stub.Join, pb.JoinRequest(manifest=manifest(spec.floats)), timeout=RPC_TIMEOUT_S)
        if reply.action != pb.JoinResponse.ACTION_TRAIN:
            raise RuntimeError(f"Join answered {pb.JoinResponse.Action.Name(reply.action)}")
        record.stage = "download"

        def download() -> None:
            for _ in stub.DownloadState(pb.DownloadStateRequest(), timeout=RPC_TIMEOUT_S):
                pass

        invoker.call(download)
        record.stage = "upload"
        at_barrier = True
        ready.wait()
        go.wait()
        if spec.stagger_s > 0:  # edges finish training at different times
            time.sleep(spec.stagger_s * record.edge / spec.edge_count)
        header = pb.UploadHeader(
            round_id=reply.round_id,
            sample_count=samples_of(record.edge),
            fingerprint=FINGERPRINT,
            encoding=pb.ENCODING_FLOAT32,
            compression=spec.compression,
            base_state_version=reply.state_version,
        )
        head = pb.UploadMessage(header=header).SerializeToString()
        body, nbytes = bodies[record.edge % spec.distinct]

        def messages() -> Iterator[bytes]:
            yield head
            yield from body

        record.message_bytes = len(head) + nbytes
        record.upload_start = time.monotonic()
        receipt = invoker.call(lambda: upload(messages(), timeout=RPC_TIMEOUT_S))
        record.upload_end = time.monotonic()
        record.receipt_wire_bytes = receipt.wire_bytes
        record.receipt_state = pb.RoundState.Name(receipt.round_state)
        record.uploaded = True
        if spec.long_poll_s > 0:  # as edge_agent does next: long-poll Join until there is news
            record.stage = "long-poll"
            request = pb.JoinRequest(manifest=manifest(spec.floats), wait_seconds=spec.long_poll_s)
            while True:
                reply = invoker.call(stub.Join, request, timeout=RPC_TIMEOUT_S + spec.long_poll_s)
                if reply.action != pb.JoinResponse.ACTION_WAIT:
                    break
            if reply.action != pb.JoinResponse.ACTION_FINISHED:
                raise RuntimeError(
                    f"Join answered {pb.JoinResponse.Action.Name(reply.action)} after the round"
                )
            record.finished_at = time.monotonic()
        record.stage = "done"
    except grpc.RpcError as exc:
        code = retry.status_code(exc)
        record.code = code.name if code is not None else "UNKNOWN"
        record.details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure, whatever it is
        record.code, record.details = type(exc).__name__, str(exc)
    finally:
        if not at_barrier:
            ready.wait()  # a failed edge still lets the others through


def worker_main(spec: WorkerSpec, start: Any, go: Any, release: Any, out: Any) -> None:
    """A client process of `spec.edges` edges as threads.

    Encodes its increments and reports ("encoded", ...); on `start` the edges join and download,
    then it reports ("ready", ...); on `go` they upload; then ("done", records); waits for `release`.
    """
    bodies = {kind: encode(kind, spec) for kind in sorted({e % spec.distinct for e in spec.edges})}
    pki_dir = Path(spec.pki_dir)
    ca = pki_dir / pki.CA_CERT_FILE
    target = f"127.0.0.1:{spec.port}"
    channels = [
        tls.secure_channel(
            target, ca, pki.cert_path(pki_dir, edge_name(e)), pki.key_path(pki_dir, edge_name(e))
        )
        for e in spec.edges
    ]
    records = [EdgeRecord(e) for e in spec.edges]
    local_go = threading.Event()
    ready = threading.Barrier(len(spec.edges) + 1)
    threads = [
        threading.Thread(target=run_edge, args=(spec, r, ch, bodies, ready, local_go), daemon=True)
        for r, ch in zip(records, channels, strict=True)
    ]
    out.put(("encoded", spec.index, os.getpid()))
    start.wait()
    for t in threads:
        t.start()
    ready.wait()
    out.put(("ready", spec.index, os.getpid()))
    go.wait()
    local_go.set()
    for t in threads:
        t.join()
    out.put(("done", spec.index, records))
    release.wait(timeout=600)
    for ch in channels:
        ch.close()


# -- the aggregator child and what is measured around it ----------------------------------------


class Aggregator:
    """`aggregator serve` as a child process; its port is read from its first stdout line."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as err:
            self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.popen.stdout.readline()
        if "listening on port" not in line:
            self.popen.kill()
            raise RuntimeError(f"aggregator did not start: {line!r}; see {log}")
        self.port = int(line.rsplit(" ", 1)[1])
        self.process = psutil.Process(self.popen.pid)

    def rss(self) -> int:
        """Resident bytes of the aggregator and its children now."""
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def hwm_bytes(self) -> int:
        """VmHWM: the kernel's peak resident set of the aggregator process."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        """SIGTERM, wait; returns the exit status."""
        self.popen.terminate()
        try:
            return self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


class Sampler(threading.Thread):
    """Samples the aggregator's RSS every SAMPLE_PERIOD_S: (monotonic time, bytes)."""

    def __init__(self, agg: Aggregator) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.agg = agg
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.samples.append((time.monotonic(), self.agg.rss()))
            except psutil.Error:
                return
            self.halt.wait(SAMPLE_PERIOD_S)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        """The largest sample within [since, until]."""
        return max((b for t, b in self.samples if since <= t <= until), default=0)


def start_aggregator(work: Path, pki_dir: Path, edges: int, settings: dict[str, Any]) -> Aggregator:
    """One round, quorum = min_edges = edges; `settings` (TOML keys) override the defaults."""
    cmd = [
        sys.executable,
        "-m",
        "aggregator.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(work / "state"),
        "--cert",
        str(pki.cert_path(pki_dir, "aggregator")),
        "--key",
        str(pki.key_path(pki_dir, "aggregator")),
        "--ca",
        str(pki_dir / pki.CA_CERT_FILE),
        "--rounds",
        "1",
        "--quorum",
        str(edges),
        "--min-edges",
        str(edges),
        "--deadline",
        "3600",
        "--log-level",
        "INFO",
    ]
    if settings:
        lines = []
        for section, keys in SECTIONS.items():
            chosen = {k: v for k, v in settings.items() if k in keys}
            if chosen:
                lines.append(f"[{section}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in chosen.items()]
        config = work / "aggregator.toml"
        config.write_text("\n".join(lines) + "\n")
        cmd += ["--config", str(config)]
    return Aggregator(cmd, work / "aggregator.log")


def server_phases(log: Path) -> dict[str, float]:
    """Median and max of the per-upload phases the aggregator logs ("queued", "receive+verify" ...)."""
    found = re.findall(
        r"([0-9.]+) s queued, ([0-9.]+) s receive\+verify, ([0-9.]+) s sum\+fsync", log.read_text()
    )
    out: dict[str, float] = {}
    for k, name in enumerate(("queued", "receive_verify", "sum_fsync")):
        values = [float(f[k]) for f in found]
        if values:
            out[f"{name}_median_s"] = statistics.median(values)
            out[f"{name}_max_s"] = max(values)
    return out


def receive(out: Any, workers: list[Any], timeout: float) -> tuple[Any, ...]:
    """The next message of a client process; raise if one died or none spoke within `timeout`."""
    until = time.monotonic() + timeout
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client process died (exit code {dead[0]})") from None
            if time.monotonic() > until:
                raise TimeoutError(f"no word from the client processes in {timeout:.0f} s") from None


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` so far (0 for one that is gone)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def machine_cpu() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy so far (all processes, all cores), and in softirq.

    Loopback TCP is processed in softirq, which the kernel charges to no process.
    """
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0), getattr(t, "softirq", 0.0)


def check_state(
    port: int, pki_dir: Path, round_id: int, edges: int, floats: int, distinct: int
) -> dict[str, Any]:
    """Read the closed round and the global state back; compare with the expected FedAvg."""
    channel = tls.secure_channel(
        f"127.0.0.1:{port}",
        pki_dir / pki.CA_CERT_FILE,
        pki.cert_path(pki_dir, edge_name(0)),
        pki.key_path(pki_dir, edge_name(0)),
    )
    try:
        stub = pb_grpc.FederationStub(channel)
        status = stub.GetRound(pb.GetRoundRequest(round_id=round_id), timeout=RPC_TIMEOUT_S)
        stream = iter(stub.DownloadState(pb.DownloadStateRequest(), timeout=RPC_TIMEOUT_S))
        header = next(stream).header
        assembler = tensors.ChunkAssembler(list(header.tensors), header.encoding, header.compression)
        state = None
        for message in stream:
            if message.WhichOneof("kind") == "chunk":
                assembler.add(message.chunk)
            else:
                state = assembler.finish(message.trailer)[0]
    finally:
        channel.close()
    uploaded = sum(e.uploaded for e in status.edges)
    result: dict[str, Any] = {
        "round_state": pb.RoundState.Name(status.state),
        "uploaded_edges": uploaded,
        "state_version": header.state_version,
        "server_wire_up_bytes": status.bytes.wire_up,
    }
    if state is None:
        return {**result, "ok": False, "why": "no state downloaded"}
    want = expected_state(edges, floats, distinct)
    diff = float(np.abs(state.astype(np.float64) - want).max()) if want.size else 0.0
    ok = (
        status.state == pb.ROUND_STATE_CLOSED
        and uploaded == edges
        and header.state_version == 2
        and bool(np.allclose(state, want, rtol=1e-6, atol=1e-12))
    )
    return {**result, "max_abs_error": diff, "ok": ok}


# -- the run ------------------------------------------------------------------------------------


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the aggregator's code differs from it (others edit too)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "aggregator", "fedocr", "proto"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return {}
    return {
        "commit": head.stdout.strip(),
        "aggregator_uncommitted": [line[3:] for line in dirty.stdout.splitlines()],
    }


def issue_pki(pki_dir: Path, edges: int) -> float:
    """CA, server certificate and `edges` edge certificates; returns the seconds it took."""
    t0 = time.perf_counter()
    pki.create_ca(pki_dir)
    pki.issue(pki_dir, pki.ROLE_SERVER, "aggregator", hosts=["127.0.0.1"])
    for e in range(edges):
        pki.issue(pki_dir, pki.ROLE_EDGE, edge_name(e))
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One measured round; returns every figure as a JSON-ready dict."""
    settings = {
        k: v
        for k, v in {
            "max_concurrent_uploads": args.max_concurrent_uploads,
            "max_workers": args.max_workers,
            "upload_wait_s": args.upload_wait,
            "stream_window_bytes": args.stream_window,
        }.items()
        if v is not None
    }
    defaults = AggregatorConfig()
    effective = {
        k: settings.get(k, getattr(defaults, k))
        for k in ("max_concurrent_uploads", "max_workers", "upload_wait_s", "stream_window_bytes")
    }
    procs = max(1, min(args.client_procs, args.edges))
    result: dict[str, Any] = {
        "edges": args.edges,
        "floats": args.floats,
        "distinct_increments": min(args.distinct, args.edges),
        "compression": args.compression,
        "long_poll_s": args.long_poll,
        "stagger_s": args.stagger,
        "client_processes": procs,
        "aggregator": effective,
        "cores": os.cpu_count(),
        "load_before": list(os.getloadavg()),
        "source": source_state(),
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fedocr-load-") as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        result["pki_s"] = issue_pki(pki_dir, args.edges)
        agg = start_aggregator(work, pki_dir, args.edges, settings)
        sampler = Sampler(agg)
        sampler.start()
        workers: list[Any] = []
        start, go, release, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        try:
            rss_idle = agg.rss()
            for k in range(procs):
                spec = WorkerSpec(
                    k,
                    agg.port,
                    str(pki_dir),
                    tuple(range(k, args.edges, procs)),
                    args.floats,
                    args.distinct,
                    COMPRESSIONS[args.compression],
                    args.zstd_level,
                    args.long_poll,
                    args.stagger,
                    args.edges,
                )
                worker = ctx.Process(target=worker_main, args=(spec, start, go, release, out), daemon=True)
                worker.start()
                workers.append(worker)
            client_ps = [psutil.Process(w.pid) for w in workers]
            me = psutil.Process()
            # every process has encoded its increments before the first edge joins
            for tag in ("encoded", "ready"):
                for _ in range(procs):
                    got, _, _ = receive(out, workers, args.timeout)
                    assert got == tag, f"a client process said {got!r} before {tag!r}"
                start.set()
            rss_ready = agg.rss()
            cpu0 = (cpu_seconds([agg.process]), cpu_seconds(client_ps), cpu_seconds([me]), *machine_cpu())
            t_go = time.monotonic()
            go.set()
            records: list[EdgeRecord] = []
            for _ in range(procs):
                _, _, batch = receive(out, workers, args.timeout)
                records += batch
            t_end = time.monotonic()
            cpu1 = (cpu_seconds([agg.process]), cpu_seconds(client_ps), cpu_seconds([me]), *machine_cpu())
            release.set()
            for w in workers:
                w.join(timeout=30)
            time.sleep(2 * SAMPLE_PERIOD_S)
            ok = [r for r in records if r.uploaded]
            round_id = 1
            result["state_check"] = check_state(
                agg.port, pki_dir, round_id, args.edges, args.floats, min(args.distinct, args.edges)
            )
        finally:
            sampler.halt.set()
            sampler.join()
            release.set()
            for w in workers:
                if w.is_alive():
                    w.terminate()
            hwm = agg.hwm_bytes() if agg.popen.poll() is None else 0
            result["aggregator_exit"] = agg.stop()
        result["server_phases"] = server_phases(agg.log)
        lines = agg.log.read_text().splitlines()
        result["aggregator_log"] = {
            level: [line.split(": ", 1)[-1][:240] for line in lines if f" {level} " in line]
            for level in ("ERROR", "WARNING")
        }
    result["load_after"] = list(os.getloadavg())
    first_join = min(r.join_start for r in records)
    closed = max((r.upload_end for r in ok), default=t_end)
    upload_s = closed - t_go
    message_bytes = sum(r.message_bytes for r in ok)
    latencies = sorted(r.upload_end - r.upload_start for r in ok)
    retries = Counter(code for r in records for code in r.retries)
    d_agg, d_clients, d_me, d_machine, d_softirq = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    cores = os.cpu_count() or 1
    result.update(
        {
            "round_s": closed - first_join,
            "join_download_s": t_go - first_join,
            "upload_phase_s": upload_s,
            "uploads_counted": len(ok),
            "upload_message_bytes": message_bytes,
            "upload_wire_payload_bytes": sum(r.receipt_wire_bytes for r in ok),
            "ingest_mb_s": message_bytes / upload_s / MB if upload_s > 0 else 0.0,
            "upload_latency_s": {
                "median": statistics.median(latencies) if latencies else None,
                "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
                "max": latencies[-1] if latencies else None,
            },
            "receipts_closed": sum(r.receipt_state == "ROUND_STATE_CLOSED" for r in ok),
            "failures": dict(Counter(r.code for r in records if r.code is not None)),
            "failures_by_stage": dict(Counter(r.stage for r in records if r.code is not None)),
            "finished_after_close_s": (
                max(r.finished_at for r in records) - closed if all(r.finished_at for r in records) else None
            ),
            "failure_examples": sorted({f"{r.stage}: {r.code} {r.details}"[:200] for r in records if r.code})[
                :5
            ],
            "retries": dict(retries),
            "edges_retried": sum(bool(r.retries) for r in records),
            "rss_mib": {
                "idle": rss_idle / MIB,
                "after_joins_downloads": rss_ready / MIB,
                "peak": sampler.peak() / MIB,
                "peak_upload_phase": sampler.peak(t_go, t_end) / MIB,
                "vm_hwm": hwm / MIB,
                "samples": len(sampler.samples),
            },
            "cpu_upload_phase_s": {
                "aggregator": d_agg,
                "clients": d_clients,
                "benchmark_parent": d_me,
                "machine_busy": d_machine,
                "softirq": d_softirq,
                "other_processes": max(0.0, d_machine - d_agg - d_clients - d_me - d_softirq),
            },
            "client_cpu_share": d_clients / (d_clients + d_agg) if d_clients + d_agg > 0 else 0.0,
            "machine_utilisation": d_machine / (upload_s * cores) if upload_s > 0 else 0.0,
        }
    )
    return result


def table(r: dict[str, Any]) -> str:
    """The figures of one run as a plain-text table."""
    rss, cpu, lat, ph = r["rss_mib"], r["cpu_upload_phase_s"], r["upload_latency_s"], r["server_phases"]
    agg = r["aggregator"]
    model_mib = r["floats"] * 4 / MIB

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    rows = [
        (
            "edges (one TLS channel each) / client processes",
            f"{r['edges']} / {r['client_processes']}; after uploading, Join long-polls of "
            + (f"{r['long_poll_s']} s" if r["long_poll_s"] else "none")
            + (f"; uploads start over {r['stagger_s']:g} s" if r["stagger_s"] else "; uploads start at once"),
        ),
        ("floats per increment (float32 MiB)", f"{r['floats']:,} ({model_mib:.1f} MiB), {r['compression']}"),
        (
            "aggregator settings",
            f"max_concurrent_uploads {agg['max_concurrent_uploads']}, max_workers {agg['max_workers']}, "
            f"upload_wait_s {agg['upload_wait_s']}, stream window {agg['stream_window_bytes'] >> 10} KiB",
        ),
        ("PKI: CA + server + edge certificates", f"{r['pki_s']:.1f} s"),
        ("round time, first Join to round closed", f"{r['round_s']:.1f} s"),
        ("  joins + downloads (all edges ready)", f"{r['join_download_s']:.1f} s"),
        ("  upload phase (go to round closed)", f"{r['upload_phase_s']:.1f} s"),
        (
            "uploads counted / receipts saying CLOSED",
            f"{r['uploads_counted']}/{r['edges']} / {r['receipts_closed']}",
        ),
        (
            "ingest (protobuf message bytes / upload phase)",
            f"{r['ingest_mb_s']:.0f} MB/s ({r['upload_message_bytes'] / MB:,.0f} MB)",
        ),
        (
            "upload latency median / p95 / max",
            f"{fmt(lat['median'], '.1f')} / {fmt(lat['p95'], '.1f')} / {fmt(lat['max'], '.1f')} s",
        ),
        (
            "server per upload: queued max, receive+verify and sum+fsync median",
            f"{fmt(ph.get('queued_max_s'), '.1f')} s, {fmt(ph.get('receive_verify_median_s'), '.3f')} s, "
            f"{fmt(ph.get('sum_fsync_median_s'), '.3f')} s",
        ),
        (
            "aggregator RSS: idle / after joins / peak (VmHWM)",
            f"{rss['idle']:.0f} / {rss['after_joins_downloads']:.0f} / {rss['peak']:.0f} "
            f"({rss['vm_hwm']:.0f}) MiB; peak / model {rss['peak'] / model_mib:.1f}x",
        ),
        (
            "client failures by status code (by stage)",
            f"{json.dumps(r['failures'])} ({json.dumps(r['failures_by_stage'])})"
            if r["failures"]
            else "none",
        ),
        (
            "retries by status code (edges that retried)",
            f"{json.dumps(r['retries']) if r['retries'] else 'none'} ({r['edges_retried']})",
        ),
        (
            "CPU s in upload phase: aggregator / clients / softirq / other",
            f"{cpu['aggregator']:.1f} / {cpu['clients']:.1f} / {cpu['softirq']:.1f} / "
            f"{cpu['other_processes']:.1f}; "
            f"client share {r['client_cpu_share']:.2f}, machine {r['machine_utilisation']:.0%} busy",
        ),
        (
            "aggregator log: ERROR / WARNING lines",
            f"{len(r['aggregator_log']['ERROR'])} / {len(r['aggregator_log']['WARNING'])}"
            + "".join(
                f"\n    {line}"
                for line in (r["aggregator_log"]["ERROR"] + r["aggregator_log"]["WARNING"])[:3]
            ),
        ),
        (
            "final state == FedAvg of the uploads",
            f"{'yes' if r['state_check']['ok'] else 'NO'} (max abs error "
            f"{r['state_check'].get('max_abs_error', float('nan')):.1e})",
        ),
        (
            "code measured",
            f"{r['source'].get('commit', '?')}"
            + (
                f" + uncommitted {' '.join(r['source']['aggregator_uncommitted'])}"
                if r["source"].get("aggregator_uncommitted")
                else ""
            ),
        ),
        (
            "load average 1/5/15 min before -> after",
            " / ".join(f"{x:.2f}" for x in r["load_before"])
            + " -> "
            + " / ".join(f"{x:.2f}" for x in r["load_after"]),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --short shrinks the defaults for a quick check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, help=f"concurrent edges (default {DEFAULT_EDGES})")
    parser.add_argument(
        "--floats", type=int, help=f"float32 values per increment (default {DEFAULT_FLOATS:,})"
    )
    parser.add_argument(
        "--short", action="store_true", help=f"quick check: {SHORT_EDGES} edges x {SHORT_FLOATS:,} floats"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="client processes the edges share")
    parser.add_argument("--distinct", type=int, default=4, help="distinct increments (edge j sends j %% N)")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default="zstd")
    parser.add_argument("--zstd-level", type=int, default=3, help="as edge_agent (default 3)")
    parser.add_argument("--max-concurrent-uploads", type=int, help="aggregator setting (default: its own)")
    parser.add_argument("--max-workers", type=int, help="aggregator RPC threads (default: its own)")
    parser.add_argument("--upload-wait", type=float, help="aggregator upload_wait_s (default: its own)")
    parser.add_argument("--stream-window", type=int, help="aggregator stream_window_bytes (default: its own)")
    parser.add_argument(
        "--long-poll",
        type=int,
        default=30,
        help="after its upload each edge long-polls Join this long per call until FINISHED, as edge_agent "
        "does (default 30; 0: no long-poll)",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="spread the uploads' starts over this many seconds"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up on a phase after this")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.edges is None:
        args.edges = SHORT_EDGES if args.short else DEFAULT_EDGES
    if args.floats is None:
        args.floats = SHORT_FLOATS if args.short else DEFAULT_FLOATS
    if args.edges < 1 or args.floats < 1 or args.distinct < 1:
        parser.error("--edges, --floats and --distinct must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one round under load, print the table (and write JSON); 1 if anything failed."""
    args = parse_args(argv)
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    good = not result["failures"] and result["state_check"]["ok"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
