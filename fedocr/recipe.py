"""The default training recipe (measured on CPUs by benchmarks/learning.py), defined once and torch-free.

``recognizer train`` and the edges read it through recognizer.recipe, the aggregator's default plan
(aggregator.config) reads it directly; the paper's setting (Adadelta, lr 1.0, x0.1 and x0.01 at
rounds 5 and 30, batch 64) stays selectable everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

OPTIMIZERS = ("adam", "adamw", "adadelta")
# Each optimizer's base lr: Adam's and AdamW's measured here, Adadelta's the paper's.
DEFAULT_LR = MappingProxyType({"adam": 2e-3, "adamw": 2e-3, "adadelta": 1.0})
# The lr is x0.1 from the first decay point on and x0.01 from the second (the paper: rounds 5 and 30).
DECAY_FACTORS = (0.1, 0.01)


@dataclass(frozen=True)
class Recipe:
    """The knobs that ``recognizer train`` and the aggregator's plan both default from."""

    optimizer: str = "adam"  # learns fastest on a CPU; the paper's Adadelta is slower here
    batch_size: int = 16  # the paper's 64 halves the steps per epoch on small shards
    epochs: int = 1  # epochs of ``recognizer train``; local epochs per round in the plan
    decay_at: tuple[int, ...] = ()  # epochs (rounds in the plan) from which the lr decays; none by default

    @property
    def lr(self) -> float:
        """The base learning rate of this recipe's optimizer."""
        return DEFAULT_LR[self.optimizer]


RECIPE = Recipe()
