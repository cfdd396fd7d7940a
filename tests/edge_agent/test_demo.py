"""experiments/demo.py (`make demo`) leaves no process behind when it is interrupted or a step fails."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def start_demo(work: Path, *extra: str) -> subprocess.Popen:
    args = [
        "--work-dir",
        str(work),
        "--edges",
        "2",
        "--rounds",
        "3",
        "--train-words",
        "600",
        "--test-words",
        "50",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.demo", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def leftovers(work: Path) -> list[str]:
    """Command lines of live processes that were started for this demo's working directory."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(work) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def test_ctrl_c_stops_the_aggregator_and_the_edges(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    demo = start_demo(work)
    line = ""
    while "aggregator on" not in line:  # wait until the federation is running
        line = demo.stdout.readline()
        assert line, demo.stderr.read()
    deadline = time.monotonic() + 60
    while len(leftovers(work)) < 4 and time.monotonic() < deadline:  # demo, aggregator, 2 edges
        time.sleep(0.1)
    assert len(leftovers(work)) >= 4, leftovers(work)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err
    assert "interrupted; processes stopped" in err
    assert leftovers(work) == []


def test_a_failing_step_reports_it_and_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    demo = start_demo(work, "--preset", "no-such-preset")  # every edge refuses to start
    _, err = demo.communicate(timeout=180)
    assert demo.returncode == 1
    assert "edge edge-0 exited with 2" in err and str(work / "edges" / "edge-0" / "edge.log") in err
    assert leftovers(work) == []
