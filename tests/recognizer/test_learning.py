"""A small model trained from scratch reads words it never saw; the same state under another key does not.

This is the test that fails when a change breaks learning: the default recipe (``recognizer
train``'s defaults on the default CPU preset, hashed at gamma 1/2, one thread) must take the
recognizer off its initial plateau to at least 50% word accuracy on held-out images rendered with
another seed, within a bounded number of steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recognizer import state
from recognizer.dataset import make_loader
from recognizer.model import build_model
from recognizer.model_io import model_from_packed
from recognizer.recipe import DEFAULT_LR
from recognizer.synth import render_dataset
from recognizer.train import evaluate, make_optimizer, train_epoch

KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
PRESET, GAMMA = "fedocr-tiny", 0.5
LABELS = "digits"  # no language model to fall back on: the model must read to score
TRAIN, HELD_OUT = 4000, 200
BATCH = 16
MAX_STEPS = 2500  # it reaches 50% at about 1,000: room for another machine's arithmetic
EVAL_EVERY = 250


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train until 50% held-out word accuracy (or MAX_STEPS); the model, its W_0 and the curve."""
    work = tmp_path_factory.mktemp("learning")
    render_dataset(work / "train", TRAIN, seed=101, styles=["clean"], labels=LABELS, workers=2)
    render_dataset(work / "held-out", HELD_OUT, seed=202, styles=["clean"], labels=LABELS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(PRESET, KEY, GAMMA)
    w0 = state.pack_model(model, KEY)
    data = model.image_options
    loader = make_loader(work / "train", BATCH, shuffle=True, drop_last=True, **data)
    held_out = make_loader(work / "held-out", 100, shuffle=False, **data)
    optimizer = make_optimizer(model, DEFAULT_LR["adam"], "adam")
    steps, curve = 0, []

    def score(step: int, _loss: float) -> None:
        nonlocal steps
        steps += 1
        if steps % EVAL_EVERY == 0:
            curve.append((steps, evaluate(model, held_out, beam_width=1).accuracy))
            if curve[-1][1] >= 0.5 or steps >= MAX_STEPS:
                raise StopIteration

    try:
        while steps < MAX_STEPS:
            train_epoch(model, loader, optimizer, on_batch=score)
    except StopIteration:
        pass
    finally:
        torch.set_num_threads(threads)
    return {"model": model, "w0": w0, "curve": curve, "held_out": held_out}


@pytest.mark.timeout(900)
def test_a_small_model_from_scratch_reads_held_out_words(trained: dict) -> None:
    curve = trained["curve"]
    assert curve and curve[-1][1] >= 0.5, f"held-out word accuracy by step: {curve}"


@pytest.mark.timeout(600)
def test_the_global_state_reads_only_under_its_key(trained: dict) -> None:
    model, held_out = trained["model"], trained["held_out"]
    right = evaluate(model, held_out, beam_width=1).accuracy
    # What an aggregator holds after training: the packed sum of increments G = W - W_0, which
    # an edge turns back into a model as W_0 + G under the federation key.
    g = state.pack_model(model, KEY) - trained["w0"]
    again, _ = model_from_packed(PRESET, GAMMA, KEY, trained["w0"] + g)
    wrong_w0 = state.pack_model(build_model(PRESET, WRONG_KEY, GAMMA), WRONG_KEY)
    stolen, _ = model_from_packed(PRESET, GAMMA, WRONG_KEY, wrong_w0 + g)
    assert right >= 0.5
    assert evaluate(again, held_out, beam_width=1).accuracy == pytest.approx(right)
    assert evaluate(stolen, held_out, beam_width=1).accuracy <= 0.02
    assert not np.allclose(wrong_w0, trained["w0"])
