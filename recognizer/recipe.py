"""The default training recipe of the CPU presets (measured by benchmarks/learning.py), torch-free.

``recognizer train``, ``edge_agent`` and the aggregator's default plan share these; the paper's
setting (Adadelta, lr 1.0, decayed x0.1 and x0.01, batch 64) stays selectable everywhere.
"""

from __future__ import annotations

OPTIMIZERS = ("adam", "adamw", "adadelta")
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LR = {"adam": 2e-3, "adamw": 2e-3, "adadelta": 1.0}
DEFAULT_BATCH_SIZE = 16
