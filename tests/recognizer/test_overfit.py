"""The tiny preset, hashed, memorises a few dozen words: the whole training path really learns."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch

from recognizer.dataset import make_loader
from recognizer.lmdb_data import LmdbWriter
from recognizer.model import build_model
from recognizer.synth import render_word
from recognizer.train import evaluate, train_epoch

WORDS = ("cat", "dog", "sun", "tree", "bird", "fish", "road", "door", "lamp", "book", "milk", "rain",
         "wind", "star", "moon", "fire", "ship", "gold", "rose", "king", "bell", "leaf", "snow", "wolf")


@pytest.mark.timeout(900)  # about 450 steps: a minute or so on one core
def test_tiny_hashed_model_overfits_two_dozen_words(tmp_path: Path) -> None:
    rng = random.Random(0)
    with LmdbWriter(tmp_path / "words") as writer:
        for word in WORDS:
            buf = io.BytesIO()
            render_word(word, "clean", rng).save(buf, "PNG")
            writer.add(buf.getvalue(), word)
    batches = list(make_loader(tmp_path / "words", len(WORDS), shuffle=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a batch of 24 gains little from a second thread and stalls if a core is busy
    torch.manual_seed(0)
    model = build_model("fedocr-tiny", bytes(range(32)), gamma=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy, losses = 0.0, []
    try:
        for step in range(600):
            losses.append(train_epoch(model, batches, optimizer).loss)
            if step % 25 == 24:
                accuracy = evaluate(model, batches, beam_width=1).accuracy
                if accuracy == 1.0:
                    break
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.2 * losses[0]
    assert accuracy == 1.0, f"read {accuracy:.0%} of the training words after {len(losses)} steps"
