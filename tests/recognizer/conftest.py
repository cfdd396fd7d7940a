"""Fixtures shared by the recognizer tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recognizer.dataset import make_loader
from recognizer.model import build_model

READER_SCRIPT = Path(__file__).with_name("digit_reader.py")
READER = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start training the digit reader (digit_reader.py) in its own process once a test needs it."""
    needed = any("digit_reader" in getattr(item, "fixturenames", ()) for item in items)
    if not needed or config.stash.get(READER, None):
        return
    out = Path(tempfile.mkdtemp(prefix="fedocr-digit-reader-"))
    with open(out / "train.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(READER_SCRIPT), str(out)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    config.stash[READER] = (proc, out)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the digit reader's process if it still runs, and remove its files."""
    started = config.stash.get(READER, None)
    if started:
        proc, out = started
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: on tiny tensors a second one only spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digit_reader(request: pytest.FixtureRequest) -> dict:
    """A model that reads, trained once per test run and shared (test_learning, test_augment).

    Returns {'model', 'w0' (its packed initial state), 'curve' ([(step, held-out accuracy)]),
    'held_out' (a loader), 'held_out_path', 'key', 'preset', 'gamma'}.
    """
    proc, out = request.config.stash[READER]
    if proc.wait() != 0:
        log = (out / "train.log").read_text(errors="replace")[-4000:]
        pytest.fail(f"training the digit reader failed ({READER_SCRIPT.name} exited {proc.returncode}):\n"
                    f"{log}")
    meta = json.loads((out / "reader.json").read_text())
    key = bytes.fromhex(meta["key"])
    model = build_model(meta["preset"], key, meta["gamma"])
    model.load_state_dict(torch.load(out / "reader.pt"))
    model.train(meta["training"])
    held_out = make_loader(out / "held-out", 100, shuffle=False, **model.image_options)
    return {"model": model, "w0": np.load(out / "w0.npy"), "curve": [tuple(c) for c in meta["curve"]],
            "held_out": held_out, "held_out_path": out / "held-out",
            "key": key, "preset": meta["preset"], "gamma": meta["gamma"]}
