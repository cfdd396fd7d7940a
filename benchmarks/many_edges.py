"""Many edges on one machine (not a test): N light edges join one round, each uploads a small
increment, then all of them long-poll Join while the round waits for one more edge; that edge
uploads, the round closes and every waiting poll must answer FINISHED.

    .venv/bin/python -m benchmarks.many_edges --edges 1000 [--floats 10000] [--hold 45]
    .venv/bin/python -m benchmarks.many_edges --edges 10000 --client-procs 4

The edges are multiplexed over a few client processes, each an asyncio loop with one mutual-TLS
channel per edge (its own certificate), all on 127.0.0.1. Printed and written as JSON: the round's
wall time, uploads per second, the aggregator's resident memory before the edges came, while they
all waited and at its peak, its threads, its CPU per upload, and every failure by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from benchmarks.load.run import issue_pki
from benchmarks.load.server import Sampler, start_aggregator
from benchmarks.load.workload import FINGERPRINT, edge_name, increment, manifest, samples_of
from fedocr import harness, pki, tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
RPC_TIMEOUT_S = 120.0
RETRY_FOR_S = 900.0  # an edge gives up on a call after retrying this long
MIB = float(1 << 20)
T = TypeVar("T")


@dataclass(frozen=True)
class ClientSpec:
    """One client process: its edges, the aggregator and the workload."""

    index: int
    port: int
    pki_dir: str
    edges: tuple[int, ...]
    floats: int
    poll_s: int
    concurrent: int  # joins and uploads in flight at once in this process


@dataclass
class Tally:
    """What a client process reports at the end."""

    uploaded: int = 0
    finished: int = 0
    polls: int = 0
    retries: int = 0
    failures: dict[str, int] | None = None


def upload_messages(round_id: int, version: int, edge: int, floats: int) -> list[pb.UploadMessage]:
    """A float32 upload of ``floats`` values, zstd-compressed, as edge_agent sends it."""
    encoder = tensors.ChunkEncoder([increment(edge % 7, floats)], pb.ENCODING_FLOAT32, pb.COMPRESSION_ZSTD,
                                   level=1, ids=[0])  # fmt: skip
    header = pb.UploadHeader(round_id=round_id, sample_count=samples_of(edge), fingerprint=FINGERPRINT,
                             encoding=pb.ENCODING_FLOAT32, compression=pb.COMPRESSION_ZSTD,
                             base_state_version=version)  # fmt: skip
    return [pb.UploadMessage(header=header), *(pb.UploadMessage(chunk=c) for c in encoder.chunks()),
            pb.UploadMessage(trailer=encoder.trailer())]  # fmt: skip


async def _call(tally: Tally, make: Callable[[], Awaitable[T]]) -> T:
    """One RPC (``make()`` starts it), retried with backoff on UNAVAILABLE, RESOURCE_EXHAUSTED and
    DEADLINE_EXCEEDED."""
    delay, until = 0.2, time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return await make()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRIED or time.monotonic() > until:
                raise
            tally.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _edge(spec: ClientSpec, edge: int, gate: asyncio.Semaphore, tally: Tally, out: Any) -> None:
    pki_dir = Path(spec.pki_dir)
    name = edge_name(edge)
    creds = tls.channel_credentials(
        pki_dir / pki.CA_CERT_FILE, pki.cert_path(pki_dir, name), pki.key_path(pki_dir, name)
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{spec.port}", creds) as channel:
        stub = pb_grpc.FederationStub(channel)
        m = manifest(spec.floats)
        stage = "upload"
        try:
            async with gate:
                reply = await _call(
                    tally, lambda: stub.Join(pb.JoinRequest(manifest=m), timeout=RPC_TIMEOUT_S)
                )
                if reply.action != pb.JoinResponse.ACTION_TRAIN:
                    raise RuntimeError(f"Join answered {pb.JoinResponse.Action.Name(reply.action)}")
                body = upload_messages(reply.round_id, reply.state_version, edge, spec.floats)
                await _call(tally, lambda: stub.UploadIncrement(iter(body), timeout=RPC_TIMEOUT_S))
            tally.uploaded += 1
            out.put(("uploaded", spec.index, 1))
            stage = "long-poll"
            request = pb.JoinRequest(manifest=m, wait_seconds=spec.poll_s)
            while True:
                tally.polls += 1
                reply = await _call(tally, lambda: stub.Join(request, timeout=RPC_TIMEOUT_S + spec.poll_s))
                if reply.action != pb.JoinResponse.ACTION_WAIT:
                    break
            if reply.action == pb.JoinResponse.ACTION_FINISHED:
                tally.finished += 1
                out.put(("finished", spec.index, 1))
            else:
                raise RuntimeError(
                    f"Join answered {pb.JoinResponse.Action.Name(reply.action)} after the round"
                )
        except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure, whatever it is
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            tally.failures[code] = tally.failures.get(code, 0) + 1
            out.put(("failed", spec.index, (stage, edge, f"{name} in {stage}: {code} {exc}"[:300])))


def client_main(spec: ClientSpec, out: Any) -> None:
    """A client process: every edge of ``spec`` as a coroutine; reports its Tally at the end."""

    async def main() -> Tally:
        tally = Tally(failures={})
        gate = asyncio.Semaphore(spec.concurrent)
        await asyncio.gather(*(_edge(spec, e, gate, tally, out) for e in spec.edges))
        return tally

    out.put(("tally", spec.index, asdict(asyncio.run(main()))))


def _threads(pid: int) -> int:
    return int(
        next(
            ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Threads:")
        ).split()[1]
    )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One measured round; returns every figure."""
    result: dict[str, Any] = {"edges": args.edges, "floats": args.floats, "poll_s": args.poll,
                              "client_processes": args.client_procs, "hold_s": args.hold,
                              "cores": os.cpu_count()}  # fmt: skip
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fedocr-many-") as tmp:
        work = Path(tmp)
        closer = args.edges  # the edge whose upload closes the round
        result["pki_s"] = round(issue_pki(work / "pki", args.edges + 1), 1)
        print(f"{args.edges + 1} edge certificates in {result['pki_s']} s", flush=True)
        settings = {"join_wait_max_s": float(args.poll),
                    "max_concurrent_uploads": args.max_concurrent_uploads}  # fmt: skip
        agg = start_aggregator(
            work, work / "pki", args.edges + 1, settings
        )  # quorum: every edge and the closer
        sampler = Sampler(agg)
        sampler.start()
        out = ctx.Queue()
        procs = []
        try:
            result["rss_before_mib"] = round(agg.rss() / MIB, 1)
            result["threads_before"] = _threads(agg.popen.pid)
            cpu0, t0 = _cpu_s(agg.popen.pid), time.monotonic()
            shares = [tuple(range(k, args.edges, args.client_procs)) for k in range(args.client_procs)]
            for k, edges in enumerate(shares):
                spec = ClientSpec(
                    k, agg.port, str(work / "pki"), edges, args.floats, args.poll, args.concurrent
                )
                procs.append(ctx.Process(target=client_main, args=(spec, out), daemon=True))
                procs[-1].start()
            counts = {
                "uploaded": 0,
                "finished": 0,
                "failed": 0,
                "failed_before_upload": 0,
                "failed_in_long_poll": 0,
            }
            failures: list[str] = []
            not_uploaded: list[int] = []  # edges that failed before their upload: they close the round
            tallies: list[dict[str, Any]] = []

            def drain(until: float, stop: Any) -> None:
                while time.monotonic() < until and not stop():
                    try:
                        kind, _, value = out.get(timeout=0.5)
                    except queue.Empty:
                        if any(p.exitcode not in (None, 0) for p in procs):
                            raise RuntimeError("a client process died") from None
                        continue
                    if kind == "tally":
                        tallies.append(value)
                    else:
                        counts[kind] += 1
                        if kind == "failed":
                            stage, edge, text = value
                            if stage == "upload":
                                counts["failed_before_upload"] += 1
                                not_uploaded.append(edge)
                            else:
                                counts["failed_in_long_poll"] += 1
                            if len(failures) < 20:
                                failures.append(text)
                                print(f"failed: {text}", flush=True)

            in_or_out = lambda: counts["uploaded"] + counts["failed_before_upload"] >= args.edges  # noqa: E731
            drain(t0 + args.timeout, in_or_out)
            t_uploaded = time.monotonic()
            cpu_uploaded = _cpu_s(agg.popen.pid)
            result["uploads_s"] = round(t_uploaded - t0, 2)
            result["uploads_per_s"] = round(counts["uploaded"] / (t_uploaded - t0), 1)
            result["aggregator_cpu_ms_per_upload"] = round(
                1000 * (cpu_uploaded - cpu0) / max(1, counts["uploaded"]), 2
            )
            print(
                f"{counts['uploaded']} uploads in {result['uploads_s']} s; holding {args.hold} s", flush=True
            )
            drain(time.monotonic() + args.hold, lambda: False)  # every edge long-polls now
            result["rss_waiting_mib"] = round(agg.rss() / MIB, 1)
            result["threads_waiting"] = _threads(agg.popen.pid)
            cpu_hold = _cpu_s(agg.popen.pid)
            result["aggregator_cpu_s_per_s_waiting"] = round(
                (cpu_hold - cpu_uploaded) / max(1e-9, time.monotonic() - t_uploaded), 3
            )
            t_close = time.monotonic()
            closers = (*not_uploaded, closer)  # the edges that failed before their upload, and the closer
            spec = ClientSpec(
                args.client_procs, agg.port, str(work / "pki"), closers, args.floats, args.poll, 8
            )
            procs.append(ctx.Process(target=client_main, args=(spec, out), daemon=True))
            procs[-1].start()
            drain(
                t_close + args.timeout,
                lambda: counts["finished"] + counts["failed_in_long_poll"] >= args.edges + 1,
            )
            result["close_to_all_finished_s"] = round(time.monotonic() - t_close, 2)
            result["round_wall_s"] = round(time.monotonic() - t0, 2)
            drain(time.monotonic() + 60, lambda: len(tallies) == len(procs))
            result["rss_peak_mib"] = round(sampler.peak() / MIB, 1)
            result["rss_per_waiting_edge_kib"] = round(
                (result["rss_waiting_mib"] - result["rss_before_mib"]) * 1024 / args.edges, 1
            )
            result.update(counts)
            result["polls"] = sum(t["polls"] for t in tallies)
            result["retries"] = sum(t["retries"] for t in tallies)
            merged: dict[str, int] = {}
            for t in tallies:
                for code, n in (t["failures"] or {}).items():
                    merged[code] = merged.get(code, 0) + n
            result["failures_by_code"] = merged
            result["failure_examples"] = failures[:5]
            first = harness.list_rounds(work / "pki", agg.port)["rounds"][0]  # as an operator sees it
            result["round_committed"] = sum(bool(e.get("uploaded")) for e in first["edges"])
            result["round_state"] = first.get("state")
        finally:
            sampler.halt.set()
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
            agg.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_edges", description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", type=int, default=1000)
    p.add_argument("--floats", type=int, default=10_000, help="float32 values per increment")
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=32, help="joins+uploads in flight per client process")
    p.add_argument("--poll", type=int, default=30, help="each long-poll's wait_seconds (and join_wait_max_s)")
    p.add_argument(
        "--hold", type=float, default=45.0, help="seconds every edge waits before the round closes"
    )
    p.add_argument("--max-concurrent-uploads", type=int, default=2, help="the aggregator's (default 2)")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    ok = (
        result["round_committed"] == args.edges + 1
        and result["uploaded"] == args.edges + 1
        and result["finished"] == args.edges + 1
        and not result["failed"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
