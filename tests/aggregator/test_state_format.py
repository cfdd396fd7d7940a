"""A state directory of another format version stops `aggregator serve` with a message, untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lmdb

from aggregator.store import KEY_FORMAT, Store
from fedocr import harness


def test_serve_refuses_another_state_format_naming_the_directory(test_pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    env = lmdb.open(str(state), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(KEY_FORMAT, b"fedocr-aggregator/0")
    env.close()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.suffix == ".mdb" and p.name == "data.mdb"}
    command = harness.aggregator_command(test_pki.dir, state)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert (
        "cannot start" in proc.stderr and str(state) in proc.stderr and "fedocr-aggregator/0" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.name == "data.mdb"} == before
