"""Long-polls and draining: the RPC threads that Join and GetSecureRound hold while they wait.

Shared by the RoundCoordinator and its SecureRounds (both long-poll under the coordinator's lock):
the count of waiting polls, the once-per-round warning when they crowd out uploads, and the
draining flag that refuses new work and ends every wait early.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from aggregator.config import AggregatorConfig
from fedocr.errors import Draining

logger = logging.getLogger(__name__)


class LongPolls:
    """Waiting long-polls and whether the service drains; used with the coordinator's lock held."""

    def __init__(self, config: AggregatorConfig) -> None:
        self._config = config
        self.count = 0  # long-polls waiting now, each holding an RPC thread
        self.draining = False
        self._warned: int | None = None  # the round the thread-pool warning was logged for

    def check_serving(self) -> None:
        """Raise Draining once the aggregator is shutting down."""
        if self.draining:
            raise Draining("the aggregator is shutting down; retry against the restarted service")

    @contextmanager
    def held(self, round_id: int) -> Iterator[None]:
        """Count one long-poll of ``round_id`` for the length of a wait."""
        self.count += 1
        try:
            self._warn_if_polls_hold_pool(round_id)
            yield
        finally:
            self.count -= 1

    def _warn_if_polls_hold_pool(self, round_id: int) -> None:
        """Log once per round when long-polls leave fewer RPC threads than upload slots.

        Uploads then queue in the server's thread pool behind the polls until one ends (up to
        join_wait_max_s): with 200 edges on 64 threads, staggered uploads each waited ~23 s
        (python -m benchmarks.load --stagger 20) instead of ~0.2 s.
        """
        spare = self._config.max_workers - self.count
        if spare > self._config.max_concurrent_uploads or self._warned == round_id:
            return
        self._warned = round_id
        logger.warning(
            "round %s: %s Join long-polls hold that many of the %s RPC threads (max_workers); uploads "
            "wait for a free thread: set max_workers above the number of edges + max_concurrent_uploads",
            round_id,
            self.count,
            self._config.max_workers,
        )
