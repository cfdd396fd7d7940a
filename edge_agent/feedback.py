"""Error feedback: the part of an increment a lossy upload encoding dropped, carried to the next round.

Round t uploads Q(dW_t + r_t) and keeps r_{t+1} = dW_t + r_t - Q(dW_t + r_t), so over the rounds the
aggregator receives every value the edge trained, only later. The residual lives in the edge's
work directory (written atomically once the aggregator acknowledged the upload) and survives a
restart; one kept for another model (fingerprint or length differ) is ignored.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.npz"


class Residual:
    """The quantization error an edge still owes the aggregator, kept in ``path``."""

    def __init__(self, path: Path, length: int, fingerprint: bytes) -> None:
        self.path = path
        self._fingerprint = fingerprint
        self.values = np.zeros(length, dtype=np.float32)
        if path.exists():
            self._load(path, length)

    def _load(self, path: Path, length: int) -> None:
        try:
            with np.load(path) as doc:
                fingerprint, values = bytes(doc["fingerprint"]), doc["residual"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("%s: unreadable residual (%s); starting from zero", path, exc)
            return
        if fingerprint != self._fingerprint or values.shape != (length,) or values.dtype != np.float32:
            log.warning("%s: residual of another model; starting from zero", path)
            return
        if not np.isfinite(values).all():
            log.warning("%s: residual holds non-finite values; starting from zero", path)
            return
        self.values = values

    def add_to(self, increment: np.ndarray) -> np.ndarray:
        """The increment to encode this round: ``increment + residual``."""
        return increment + self.values

    def keep(self, sent: np.ndarray, decoded: np.ndarray) -> None:
        """Record ``sent - decoded`` (what the encoding dropped) as the next residual, durably."""
        self.values = (sent - decoded).astype(np.float32)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, fingerprint=np.frombuffer(self._fingerprint, dtype=np.uint8), residual=self.values)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """Forget the residual (the federation switched to a lossless encoding or off feedback)."""
        self.values[:] = 0
        self.path.unlink(missing_ok=True)
