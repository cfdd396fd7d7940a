"""Learning-rate schedules shared by the aggregator's round plan and the local training loops."""

from __future__ import annotations

import math

COSINE_FLOOR = 0.01  # where a cosine decay ends, as a fraction of the base lr


def cosine_lr(step: float, base_lr: float, start: float, end: float, floor: float = COSINE_FLOOR) -> float:
    """``base_lr`` until ``start``, then half a cosine down to ``floor * base_lr`` at ``end`` and after.

    ``step`` counts optimizer steps, epochs or rounds, whichever ``start`` and ``end`` count.
    Holding the lr through the take-off and decaying it smoothly after reads better than one x0.1
    drop, which hurts when it comes before the take-off (benchmarks/learning.py, rows cosine-*).
    """
    if step <= start:
        return base_lr
    t = min(1.0, (step - start) / (end - start))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
