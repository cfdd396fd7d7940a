"""The local-federation harness reports a failed edge at once, not after waiting out the others."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedocr.harness import HarnessError, LocalFederation, Settings

SETTINGS = Settings(rounds=1, local_epochs=1, preset="fedocr-tiny", gamma="1/2")



def _child(code: str) -> subprocess.Popen:
    """A Python child in its own process group, as the harness starts edges (its stop signals the group)."""
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_wait_edges_names_a_failed_edge_while_another_still_runs(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, tmp_path / "pki", tmp_path / "federation.key", SETTINGS)
    fed.edges = {
        "slow": _child("import time; time.sleep(60)"),
        "broken": _child("raise SystemExit(3)"),
    }
    started = time.monotonic()
    try:
        with pytest.raises(HarnessError, match="edge broken exited with 3"):
            fed.wait_edges(timeout_s=50)
        assert time.monotonic() - started < 30  # not after the slow edge's minute
    finally:
        fed.stop()


def test_wait_edges_returns_when_every_edge_exits_cleanly_and_times_out_otherwise(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, tmp_path / "pki", tmp_path / "federation.key", SETTINGS)
    fed.edges = {"done": _child("pass")}
    fed.wait_edges(timeout_s=30)
    fed.edges["late"] = _child("import time; time.sleep(60)")
    try:
        with pytest.raises(HarnessError, match="edge late still running after 1 s"):
            fed.wait_edges(timeout_s=1)
    finally:
        fed.stop()
