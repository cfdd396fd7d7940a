"""The recognizer's training knobs: the shared recipe defaults (fedocr.recipe) and the hashing ratio γ.

The defaults are defined in fedocr.recipe, where the aggregator's plan reads them too; the names
below are what ``recognizer train``, the edges and the benchmarks import. ``parse_gamma`` is the one
place a hashing ratio is parsed, ``check_gamma`` the one place it is range-checked.
"""

from __future__ import annotations

import math
from fractions import Fraction

from fedocr.recipe import DEFAULT_LR, OPTIMIZERS, RECIPE

DEFAULT_OPTIMIZER = RECIPE.optimizer
DEFAULT_BATCH_SIZE = RECIPE.batch_size


def check_gamma(gamma: float) -> float:
    """The hashing ratio γ as a float; ValueError unless it is a number (not a string) in (0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    if not (math.isfinite(gamma) and 0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    return float(gamma)


def parse_gamma(text: str) -> float | None:
    """γ written as ``1``, ``0.25`` or ``1/4`` → a float in (0, 1] (check_gamma); ``none``, ``off`` or
    ``-`` → None (no hashing, a baseline). Raises ValueError naming the text."""
    if text.lower() in ("none", "off", "-"):
        return None
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"gamma must be a number in (0, 1] or 'none', got {text!r}") from exc
    return check_gamma(value)


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_LR", "DEFAULT_OPTIMIZER", "OPTIMIZERS", "RECIPE", "check_gamma",
           "parse_gamma"]
