"""Group commit: one fsync makes every upload applied before it durable (receipts wait for it).

An upload is applied to the in-memory sum under the federation's lock, then waits here until a
write that includes it has been committed. The write's data is copied into the LMDB transaction
under the lock; the fsync runs with the lock released, so other uploads keep being verified and
applied meanwhile and ride on the next commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fedocr.errors import StorageUnavailable

logger = logging.getLogger(__name__)


class CommitLost(StorageUnavailable):
    """The durable write failed; the uploads it carried were rolled back and must be resent."""


class GroupCommitter:
    """Sequence numbers for applied and durable uploads, and the single writer between them.

    Parameters: ``cond`` is the federation's Condition (held by every caller of these methods);
    ``prepare`` is called under the lock and returns the commit function (the fsync) to run
    unlocked; ``rollback`` is called under the lock after a failed commit; ``after`` is called
    under the lock after every successful commit (quorum check).
    """

    def __init__(
        self,
        cond: threading.Condition,
        prepare: Callable[[], Callable[[], None]],
        rollback: Callable[[], None],
        after: Callable[[], None],
    ) -> None:
        self._cond = cond
        self._prepare, self._rollback, self._after = prepare, rollback, after
        self.applied = 0
        self.durable = 0
        self.flushing = False
        self._lost_upto = 0
        self._lost_reason = ""

    @property
    def idle(self) -> bool:
        """True when no write is running and everything applied is durable."""
        return not self.flushing and self.applied == self.durable

    def apply(self) -> int:
        """Register one upload just applied to the in-memory state; returns its sequence number."""
        self.applied += 1
        return self.applied

    def mark_all_durable(self) -> None:
        """Everything applied was made durable by another write (a round close or failure)."""
        self.durable = self.applied
        self._cond.notify_all()

    def drop_pending(self, reason: str) -> None:
        """The in-memory state went back to what the disk holds: uploads applied since the last
        durable write are not in it any more, so their waiters get CommitLost, never a receipt."""
        if self.applied > self.durable:
            self._lost_upto, self._lost_reason = self.applied, reason
            self.durable = self.applied
            self._cond.notify_all()

    def wait_durable(self, seq: int) -> None:
        """Block (lock released while waiting) until upload `seq` is durable; raise CommitLost."""
        while self.durable < seq:
            if self.flushing:
                self._cond.wait()
            else:
                self._flush()
        if seq <= self._lost_upto:
            raise CommitLost(
                f"the aggregator could not write its state to disk ({self._lost_reason}); upload again"
            )

    def _flush(self) -> None:
        self.flushing = True
        target = self.applied
        ok, reason = False, ""
        try:
            commit = self._prepare()
            self._cond.release()  # the fsync runs unlocked: others keep applying
            try:
                commit()
                ok = True
            finally:
                self._cond.acquire()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            logger.error(
                "durable write of %s upload(s) failed; rolling back to disk: %s",
                target - self.durable,
                reason,
                exc_info=not isinstance(exc, StorageUnavailable),  # a full disk needs no traceback
            )
        finally:
            self.flushing = False
        try:
            if ok:
                self.durable = max(self.durable, target)
                self._after()
            else:
                self._lost_upto, self._lost_reason = self.applied, reason
                self.durable = self.applied
                self._rollback()
        finally:
            self._cond.notify_all()  # waiters must wake whatever happened
