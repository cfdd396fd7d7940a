"""The load benchmark's one measured round: a fresh PKI and aggregator, the client processes driven
phase by phase (encoded, joined and downloaded, uploads), and every figure of it."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from aggregator.config import AggregatorConfig
from benchmarks.load.checks import check_state
from benchmarks.load.server import (
    SAMPLE_PERIOD_S,
    Sampler,
    cpu_seconds,
    machine_cpu,
    server_phases,
    start_aggregator,
)
from benchmarks.load.worker import EdgeRecord, WorkerSpec, worker_main
from benchmarks.load.workload import COMPRESSIONS, MB, MIB, edge_name
from fedocr import harness


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


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the aggregator's code differs from it (others edit too)."""
    root = Path(__file__).resolve().parents[2]
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
    """CA, server certificate and `edges` edge certificates (fedocr.harness); returns the seconds it took."""
    t0 = time.perf_counter()
    harness.make_pki(pki_dir, [edge_name(e) for e in range(edges)])
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
    result.update(summary(records, t_go, t_end, cpu0, cpu1, sampler, (rss_idle, rss_ready, hwm)))
    return result


def summary(
    records: list[EdgeRecord], t_go: float, t_end: float, cpu0: tuple[float, ...], cpu1: tuple[float, ...],
    sampler: Sampler, memory: tuple[int, int, int],
) -> dict[str, Any]:  # fmt: skip
    """The round's figures from the edges' records, the CPU seconds before and after the upload
    phase, the RSS samples and (idle, after joins, VmHWM) resident bytes of the aggregator."""
    rss_idle, rss_ready, hwm = memory
    ok = [r for r in records if r.uploaded]
    first_join = min(r.join_start for r in records)
    closed = max((r.upload_end for r in ok), default=t_end)
    upload_s = closed - t_go
    message_bytes = sum(r.message_bytes for r in ok)
    latencies = sorted(r.upload_end - r.upload_start for r in ok)
    retries = Counter(code for r in records for code in r.retries)
    d_agg, d_clients, d_me, d_machine, d_softirq = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    cores = os.cpu_count() or 1
    return {
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
        "failure_examples": sorted({f"{r.stage}: {r.code} {r.details}"[:200] for r in records if r.code})[:5],
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
