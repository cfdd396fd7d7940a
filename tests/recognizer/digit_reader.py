"""The digit reader that test_learning and test_augment share, trained in a process of its own.

``python tests/recognizer/digit_reader.py OUT`` renders clean digit strings (no dictionary to guess
from), trains fedocr-tiny at gamma 1/2 on them with train's defaults on one thread until it reads
TARGET of held-out images rendered with another seed, or MAX_STEPS, and writes OUT/reader.pt (the
state dict), OUT/w0.npy (its packed initial state), OUT/reader.json (the curve and the model's
settings) and the held-out images in OUT/held-out. It reaches 50% at about 1,000 steps and 70% at
about 1,500: the step cap leaves room for another machine's arithmetic.

The test session starts it as soon as it has collected a test that needs it (conftest.py), so its
two minutes of one-thread training run beside the tests collected before those.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from recognizer import state
from recognizer.dataset import make_loader
from recognizer.model import build_model
from recognizer.recipe import DEFAULT_LR
from recognizer.synth import render_dataset
from recognizer.train import evaluate, make_optimizer, train_epoch

KEY = bytes(range(32))
PRESET, GAMMA = "fedocr-tiny", 0.5
TRAIN, HELD_OUT, BATCH = 4000, 300, 16
TARGET, MAX_STEPS, EVAL_EVERY = 0.7, 2500, 250


def train_reader(out: Path) -> None:
    """Render the reader's data under ``out``, train it and write its files there."""
    render_dataset(out / "train", TRAIN, seed=101, styles=["clean"], labels="digits")
    render_dataset(out / "held-out", HELD_OUT, seed=202, styles=["clean"], labels="digits")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(PRESET, KEY, GAMMA)
    np.save(out / "w0.npy", state.pack_model(model, KEY))
    options = model.image_options
    loader = make_loader(out / "train", BATCH, shuffle=True, drop_last=True, **options)
    held_out = make_loader(out / "held-out", 100, shuffle=False, **options)
    optimizer = make_optimizer(model, DEFAULT_LR["adam"], "adam")
    steps, curve = 0, []

    def score(_step: int, _loss: float) -> None:
        nonlocal steps
        steps += 1
        if steps % EVAL_EVERY == 0:
            curve.append((steps, evaluate(model, held_out, beam_width=1).accuracy))
            if curve[-1][1] >= TARGET or steps >= MAX_STEPS:
                raise StopIteration

    try:
        while steps < MAX_STEPS:
            train_epoch(model, loader, optimizer, on_batch=score)
    except StopIteration:
        pass
    torch.save(model.state_dict(), out / "reader.pt")
    meta = {"curve": curve, "training": model.training, "key": KEY.hex(), "preset": PRESET, "gamma": GAMMA}
    (out / "reader.json").write_text(json.dumps(meta) + "\n")


if __name__ == "__main__":
    train_reader(Path(sys.argv[1]))
