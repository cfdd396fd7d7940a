"""benchmarks/load end to end at toy size: a real aggregator, 3 edges over mTLS, one round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_benchmark_small_round(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "benchmarks.load", "--edges", "3", "--floats", "10000", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["failures"] == {}
    assert figures["uploads_counted"] == 3
    assert figures["state_check"]["ok"], figures["state_check"]
    assert figures["aggregator_log"]["ERROR"] == []
    assert figures["rss_mib"]["peak"] > 0 and figures["round_s"] > 0
