"""Long-polls and draining: Join and GetSecureRound wait for a change without holding a thread.

The RoundCoordinator keeps its state behind one Condition (a ``NotifyingCondition``); every change
that could end a wait notifies it. The asyncio server (aggregator/server.py) subscribes a
``Wakeups`` to it: a waiting long-poll is a coroutine awaiting the next wake-up, so ten thousand
waiting edges cost ten thousand coroutines, not ten thousand RPC threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aggregator.config import AggregatorConfig
from fedocr.errors import Draining

T = TypeVar("T")


class NotifyingCondition(threading.Condition):
    """A Condition whose notify_all also calls its listeners (from the notifying thread)."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        super().__init__(lock if lock is not None else threading.RLock())
        self.listeners: list[Callable[[], None]] = []

    def notify_all(self) -> None:
        super().notify_all()
        for listener in self.listeners:
            listener()


class LongPolls:
    """Whether the service drains; used with the coordinator's lock held."""

    def __init__(self, config: AggregatorConfig) -> None:
        self._config = config
        self.draining = False

    def check_serving(self) -> None:
        """Raise Draining once the aggregator is shutting down."""
        if self.draining:
            raise Draining("the aggregator is shutting down; retry against the restarted service")


class Wakeups:
    """Wake-ups of the asyncio long-polls, fed by a NotifyingCondition from any thread.

    Notifications that arrive while a wake-up is pending coalesce into it, so a burst of commits
    costs the event loop one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next: asyncio.Future[None] = loop.create_future()
        self._pending = False
        self._lock = threading.Lock()
        self.waiting = 0  # long-polls waiting now

    def notify(self) -> None:
        """Schedule a wake-up of every waiting poll (thread-safe, cheap, never blocks)."""
        with self._lock:
            if self._pending:
                return
            self._pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop closed: nobody waits any more
            pass

    def _wake(self) -> None:
        with self._lock:
            self._pending = False
        done, self._next = self._next, self._loop.create_future()
        done.set_result(None)

    async def poll(
        self,
        check: Callable[[], Awaitable[T]],
        waiting: Callable[[T], bool],
        wait_s: float,
    ) -> T:
        """Await ``check()`` until ``waiting`` of its answer is false or ``wait_s`` passed.

        The wake-up is taken before each check, so a change that lands while the check runs
        wakes the next wait at once rather than being missed.
        """
        until = time.monotonic() + max(0.0, wait_s)
        while True:
            wake = self._next
            answer = await check()
            remaining = until - time.monotonic()
            if not waiting(answer) or remaining <= 0:
                return answer
            self.waiting += 1
            try:
                await asyncio.wait({wake}, timeout=remaining)
            finally:
                self.waiting -= 1
