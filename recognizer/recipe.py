"""The recognizer's training knobs: the shared recipe defaults (fedocr.recipe) and the hashing ratio γ.

The defaults are defined in fedocr.recipe, where the aggregator's plan reads them too; the names
below are what ``recognizer train``, the edges and the benchmarks import. ``parse_gamma`` is the one
place a hashing ratio is parsed, ``check_gamma`` the one place it is range-checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NamedRecipe:
    """Every knob of a named ``recognizer train --recipe NAME`` run and of the data it trains on.

    ``recognizer train`` takes the knobs it is not given from here; the ``synth_*`` fields are the
    ``recognizer synth`` flags of its training set (``synth_argv``). Values are to be tuned by
    measurement (benchmarks/generalization.py); change them here, nowhere else.
    """

    name: str
    preset: str = "fedocr-cpu"
    optimizer: str = RECIPE.optimizer
    batch_size: int = RECIPE.batch_size
    epochs: int = RECIPE.epochs
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    cosine_from: int | None = None  # epochs at the base lr before the cosine decay; None: no decay
    augment: str = "none"  # recognizer.augment.AUGMENTS
    augment_ops: int = 2  # N ops drawn per image ...
    augment_magnitude: float = 0.5  # ... at magnitude M in [0, 1] ...
    augment_prob: float = 0.5  # ... each applied with this probability
    average: float = 0.0  # decay of the weights' moving average written as the model; 0: the last weights
    synth_count: int = 20_000
    synth_seed: int = 1
    synth_styles: str = "varied"  # recognizer.synth.ALL_STYLES, comma-separated
    synth_labels: str = "words"
    synth_fonts: str = "train"
    synth_backgrounds: str = "train"
    long_count: int = 0  # dictionary words of 11-25 letters (--labels long), a second set in the same styles
    long_seed: int = 13

    def synth_argv(self, out: str) -> list[str]:
        """The ``recognizer synth`` arguments that render this recipe's training set to ``out``."""
        return self._argv(out, self.synth_count, self.synth_seed, self.synth_labels)

    def long_argv(self, out: str) -> list[str]:
        """The ``recognizer synth`` arguments of its long words (none when ``long_count`` is 0)."""
        return self._argv(out, self.long_count, self.long_seed, "long") if self.long_count else []

    def _argv(self, out: str, count: int, seed: int, labels: str) -> list[str]:
        return ["synth", "--out", out, "--count", str(count), "--seed", str(seed), "--styles",
                self.synth_styles, "--labels", labels, "--fonts", self.synth_fonts, "--backgrounds",
                self.synth_backgrounds]


# A recognizer meant for text it was not rendered for: a fine-tuning stage (``--init``) of a model that
# already reads the classic styles. From scratch, the varied data and augmentation hold fedocr-cpu on
# its initial plateau for about a whole epoch; warm-started, the same CPU seconds read more of every
# held-out row (docs/results/generalization.md). Its model reads 32x160 (fedocr-cpu-wide: a column per
# letter of words up to 25 long); batches of 64 on two threads process about twice the images per second
# of batches of 16 on one. Its data: the rich renderer's varied style over the training font families and
# backgrounds, realistic labels of up to 25 characters, and dictionary words of 11 to 25 letters apart
# (only 4.7% of the realistic labels are such words; 28% of the varied images with them); STRAug-style
# augmentation; two epochs at lr 0.003 decayed along a cosine from the start.
GENERAL = NamedRecipe(
    "general", preset="fedocr-cpu-wide", batch_size=64, epochs=2, lr=3e-3, cosine_from=0, augment="straug",
    synth_count=124_000, synth_seed=11, synth_labels="general", long_count=48_000,
)
RECIPES: dict[str, NamedRecipe] = {r.name: r for r in (GENERAL,)}


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_LR", "DEFAULT_OPTIMIZER", "GENERAL", "OPTIMIZERS", "RECIPE",
           "RECIPES", "NamedRecipe", "check_gamma", "parse_gamma"]
