"""What an edge tells people and files: progress lines (quiet: one per round) and a JSON-lines journal."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedocr import retry

log = logging.getLogger("edge_agent")

PROGRESS_EVERY_S = 15.0


def megabytes(n: int) -> str:
    """``n`` bytes as MB with two decimals."""
    return f"{n / 1e6:.2f} MB"


class Progress:
    """Human-readable progress on the log: rounds, epochs, loss, images/s, bytes up and down.

    Quiet mode keeps one line per round (and warnings); otherwise epochs and a line every
    PROGRESS_EVERY_S seconds within an epoch are shown too.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._last_batch_line = 0.0
        self.up_wire = self.up_raw = self.down_wire = self.down_raw = 0

    def info(self, message: str, *args: Any) -> None:
        """A line shown unless quiet."""
        if not self.quiet:
            log.info(message, *args)

    def summary(self, message: str, *args: Any) -> None:
        """A line shown even when quiet."""
        log.warning(message, *args) if self.quiet else log.info(message, *args)

    def batch(self, where: str, step: int, steps: int, loss: float) -> None:
        """A line within an epoch, at most every PROGRESS_EVERY_S seconds."""
        now = time.monotonic()
        if self.quiet or now - self._last_batch_line < PROGRESS_EVERY_S:
            return
        self._last_batch_line = now
        log.info("%s: batch %d/%d, loss %.3f", where, step + 1, steps, loss)

    def retrying(self, event: retry.RetryEvent) -> None:
        """The aggregator did not answer; say when the next attempt is."""
        log.warning(
            "aggregator unavailable (%s: %s); attempt %d failed, retrying in %.1f s",
            event.code.name,
            event.details or "no details",
            event.attempt,
            event.delay,
        )

    def moved(self, up_raw: int = 0, up_wire: int = 0, down_raw: int = 0, down_wire: int = 0) -> None:
        """Add to the running byte totals."""
        self.up_raw += up_raw
        self.up_wire += up_wire
        self.down_raw += down_raw
        self.down_wire += down_wire


class Journal:
    """Append-only JSON lines in the edge's work directory: one record per round and one at the end.

    The records (receipts, bytes, losses) are what an operator or a test compares with the
    aggregator's history; they hold no key bytes and no layer names.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once, so a killed agent loses at most the record in hand)."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
