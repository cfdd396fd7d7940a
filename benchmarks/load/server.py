"""The load benchmark's server side: the aggregator as a child, its resident memory sampled while the
round runs, its per-upload phases from its log, and the CPU seconds of it, the clients and the machine."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from aggregator.config import SECTIONS
from fedocr import harness

SAMPLE_PERIOD_S = 0.05


class Aggregator:
    """`aggregator serve` as a child process (fedocr.harness), and its memory and CPU as measured."""

    def __init__(self, service: harness.Service) -> None:
        self.service, self.popen, self.port, self.log = service, service.popen, service.port, service.log
        self.process = psutil.Process(service.pid)

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
        """SIGTERM, wait (SIGKILL after a minute); returns the exit status."""
        return harness.stop(self.popen, grace_s=60.0)


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
    flags = ["--rounds", "1", "--quorum", str(edges), "--min-edges", str(edges), "--deadline", "3600",
             "--log-level", "INFO"]  # fmt: skip
    config = None
    if settings:
        lines = []
        for section, keys in SECTIONS.items():
            chosen = {k: v for k, v in settings.items() if k in keys}
            if chosen:
                lines.append(f"[{section}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in chosen.items()]
        config = work / "aggregator.toml"
        config.write_text("\n".join(lines) + "\n")
    log = work / "aggregator.log"
    return Aggregator(harness.start_aggregator(pki_dir, work / "state", log, config=config, flags=flags))


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
