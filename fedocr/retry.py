"""Client-side retries of gRPC calls: capped exponential backoff with full jitter.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED and, if asked, RESOURCE_EXHAUSTED) are retried;
everything else (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, ALREADY_EXISTS, ...) and
any exception that is not a grpc.RpcError is raised at once. The invoker calls a function anew
on every attempt, so a client-streaming call must rebuild its request iterator inside it, and a
server-streaming call must consume its responses inside it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry.

    The n-th retry (n = 0, 1, ...) sleeps a uniform random time in
    [0, min(max_delay, base_delay * multiplier**n)] ("full jitter": clients that failed together
    do not come back together). ``max_attempts`` counts the first call; ``max_elapsed`` is in
    seconds since the first call and no sleep is started that would end past it. None means no
    limit on that axis.
    """

    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = 10
    max_elapsed: float | None = 600.0
    retry_resource_exhausted: bool = False  # the server sheds load with it; off unless asked

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < self.base_delay or self.multiplier < 1:
            raise ValueError("need 0 <= base_delay <= max_delay and multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_elapsed is not None and self.max_elapsed < 0:
            raise ValueError("max_elapsed must not be negative")

    def retryable(self, code: grpc.StatusCode | None) -> bool:
        """Whether a failure with ``code`` is worth another attempt."""
        if code in TRANSIENT_CODES:
            return True
        return self.retry_resource_exhausted and code == grpc.StatusCode.RESOURCE_EXHAUSTED

    def backoff_cap(self, retry: int) -> float:
        """The upper bound of the sleep before retry number ``retry`` (0-based)."""
        # min() before the power would overflow for large retry counts
        exponent = min(retry, 64)
        return min(self.max_delay, self.base_delay * self.multiplier**exponent)


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen, as told to ``on_retry``: attempt that failed (1-based) and why."""

    attempt: int
    code: grpc.StatusCode
    details: str
    delay: float
    elapsed: float


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a grpc.RpcError, or None for anything else."""
    code = getattr(error, "code", None)
    if not isinstance(error, grpc.RpcError) or not callable(code):
        return None
    try:
        return code()
    except Exception:  # a bare RpcError from a transport failure may have no usable code
        return None


class RetryInvoker:
    """Calls a function, retrying transient gRPC failures under a RetryPolicy.

    ``sleep``, ``clock`` and ``rng`` are injectable for tests; ``on_retry`` is called before
    each sleep (for progress displays). When it gives up, the last grpc.RpcError is raised as is.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_retry = on_retry

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``fn(*args, **kwargs)``, calling it again after each transient failure."""
        policy = self.policy
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except grpc.RpcError as exc:
                code = status_code(exc)
                if not policy.retryable(code):
                    raise
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    log.warning("giving up after %d attempts: %s", attempt, code)
                    raise
                delay = self._rng.uniform(0.0, policy.backoff_cap(attempt - 1))
                elapsed = self._clock() - start
                if policy.max_elapsed is not None and elapsed + delay > policy.max_elapsed:
                    log.warning("giving up after %d attempts and %.1f s: %s", attempt, elapsed, code)
                    raise
                details = _details(exc)
                log.info("attempt %d failed with %s (%s); retrying in %.2f s", attempt, code, details, delay)
                if self._on_retry is not None:
                    self._on_retry(RetryEvent(attempt, code, details, delay, elapsed))
                self._sleep(delay)

    __call__ = call


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    try:
        return (details() if callable(details) else "") or ""
    except Exception:
        return ""
