"""Fixtures shared by the recognizer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recognizer import state
from recognizer.dataset import make_loader
from recognizer.model import build_model
from recognizer.recipe import DEFAULT_LR
from recognizer.synth import render_dataset
from recognizer.train import evaluate, make_optimizer, train_epoch

# The digit reader: fedocr-tiny at gamma 1/2 on clean digit strings (no dictionary to guess from), with
# train's defaults on one thread, trained until it reads READER_TARGET of held-out images rendered with
# another seed, or READER_MAX_STEPS. It reaches 50% at about 1,000 steps and 70% at about 1,500: the
# step cap leaves room for another machine's arithmetic.
READER_KEY = bytes(range(32))
READER_PRESET, READER_GAMMA = "fedocr-tiny", 0.5
READER_TRAIN, READER_HELD_OUT, READER_BATCH = 4000, 300, 16
READER_TARGET, READER_MAX_STEPS, READER_EVAL_EVERY = 0.7, 2500, 250


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: on tiny tensors a second one only spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digit_reader(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model that reads, trained once per test run and shared (test_learning, test_augment).

    Returns {'model', 'w0' (its packed initial state), 'curve' ([(step, held-out accuracy)]),
    'held_out' (a loader), 'held_out_path', 'key', 'preset', 'gamma'}.
    """
    work: Path = tmp_path_factory.mktemp("digit-reader")
    render_dataset(work / "train", READER_TRAIN, seed=101, styles=["clean"], labels="digits", workers=2)
    render_dataset(work / "held-out", READER_HELD_OUT, seed=202, styles=["clean"], labels="digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(READER_PRESET, READER_KEY, READER_GAMMA)
    w0 = state.pack_model(model, READER_KEY)
    options = model.image_options
    loader = make_loader(work / "train", READER_BATCH, shuffle=True, drop_last=True, **options)
    held_out = make_loader(work / "held-out", 100, shuffle=False, **options)
    optimizer = make_optimizer(model, DEFAULT_LR["adam"], "adam")
    steps, curve = 0, []

    def score(_step: int, _loss: float) -> None:
        nonlocal steps
        steps += 1
        if steps % READER_EVAL_EVERY == 0:
            curve.append((steps, evaluate(model, held_out, beam_width=1).accuracy))
            if curve[-1][1] >= READER_TARGET or steps >= READER_MAX_STEPS:
                raise StopIteration

    try:
        while steps < READER_MAX_STEPS:
            train_epoch(model, loader, optimizer, on_batch=score)
    except StopIteration:
        pass
    finally:
        torch.set_num_threads(threads)
    return {"model": model, "w0": w0, "curve": curve, "held_out": held_out,
            "held_out_path": work / "held-out",
            "key": READER_KEY, "preset": READER_PRESET, "gamma": READER_GAMMA}
