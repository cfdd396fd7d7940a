"""The rules `python -m experiments.personal_choice` compares, on made-up validation scores."""

from __future__ import annotations

import numpy as np

from experiments.personal_choice import RULES, Scored

G = (0, 0.0)


def _scored(hits: list[bool], loss: float) -> Scored:
    correct = np.array(hits, dtype=bool)
    return Scored(float(correct.mean()), loss, correct)


def test_accuracy_and_loss_choose_differently_and_ties_keep_the_global_model() -> None:
    base = [True] * 50 + [False] * 50
    val = {
        G: _scored(base, 1.0),
        (1, 0.5): _scored([True] * 52 + [False] * 48, 0.9),  # two images more
        (2, 1.0): _scored(base, 0.7),  # as many images, the lowest loss
    }
    assert RULES["accuracy"](val, 2) == (1, 0.5)
    assert RULES["loss"](val, 2) == (2, 1.0)
    assert RULES["full"](val, 2) == (2, 1.0) and RULES["half"](val, 2) == (2, 0.5)
    tie = {G: _scored(base, 1.0), (1, 0.25): _scored(base, 1.0)}
    assert RULES["accuracy"](tie, 1) == G


def test_one_se_keeps_the_global_model_unless_the_gain_is_clear() -> None:
    base = [True] * 50 + [False] * 50
    # Two images more, two others lost and four gained: a net gain of 2 of 100, within one SE.
    noisy = base.copy()
    noisy[0] = noisy[1] = False
    for i in range(50, 54):
        noisy[i] = True
    val = {G: _scored(base, 1.0), (1, 1.0): _scored(noisy, 0.9)}
    assert RULES["accuracy"](val, 1) == (1, 1.0)
    assert RULES["one-se"](val, 1) == G
    # Ten images more and none lost: a clear gain.
    clear = [True] * 60 + [False] * 40
    val[(1, 1.0)] = _scored(clear, 0.9)
    assert RULES["one-se"](val, 1) == (1, 1.0)
