"""A small model trained from scratch reads words it never saw; the same state under another key does not.

This is the test that fails when a change breaks learning: the default recipe (``recognizer
train``'s defaults on fedocr-tiny, hashed at gamma 1/2, one thread; the session's ``digit_reader``
fixture in conftest.py) must take the recognizer off its initial plateau to at least 50% word accuracy
on held-out digit strings rendered with another seed, within a bounded number of steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from recognizer import state
from recognizer.model import build_model
from recognizer.model_io import model_from_packed
from recognizer.train import evaluate

WRONG_KEY = bytes(range(1, 33))


@pytest.mark.timeout(900)
def test_a_small_model_from_scratch_reads_held_out_words(digit_reader: dict) -> None:
    curve = digit_reader["curve"]
    assert curve and max(accuracy for _, accuracy in curve) >= 0.5, f"held-out word accuracy by step: {curve}"


@pytest.mark.timeout(600)
def test_the_global_state_reads_only_under_its_key(digit_reader: dict) -> None:
    model, held_out = digit_reader["model"], digit_reader["held_out"]
    key, preset, gamma = digit_reader["key"], digit_reader["preset"], digit_reader["gamma"]
    right = evaluate(model, held_out, beam_width=1).accuracy
    # What an aggregator holds after training: the packed sum of increments G = W - W_0, which
    # an edge turns back into a model as W_0 + G under the federation key.
    g = state.pack_model(model, key) - digit_reader["w0"]
    again, _ = model_from_packed(preset, gamma, key, digit_reader["w0"] + g)
    wrong_w0 = state.pack_model(build_model(preset, WRONG_KEY, gamma), WRONG_KEY)
    stolen, _ = model_from_packed(preset, gamma, WRONG_KEY, wrong_w0 + g)
    assert right >= 0.5
    assert evaluate(again, held_out, beam_width=1).accuracy == pytest.approx(right)
    assert evaluate(stolen, held_out, beam_width=1).accuracy <= 0.02
    assert not np.allclose(wrong_w0, digit_reader["w0"])
