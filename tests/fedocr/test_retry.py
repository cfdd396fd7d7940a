"""The retry invoker with a fake clock, a recording sleep and a fake callable raising RpcErrors."""

from __future__ import annotations

import random

import grpc
import pytest

from fedocr.retry import RetryEvent, RetryInvoker, RetryPolicy, status_code

C = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(code.name)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Flaky:
    """Raises the given codes in turn, then returns "ok"."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls = 0

    def __call__(self, *args, **kwargs) -> str:
        self.calls += 1
        if self.codes:
            raise FakeRpcError(self.codes.pop(0), "boom")
        return "ok"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class MaxRandom(random.Random):
    """Always picks the top of the jitter range, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def invoker(policy: RetryPolicy, clock: FakeTime, rng: random.Random | None = None, **kw) -> RetryInvoker:
    return RetryInvoker(policy, sleep=clock.sleep, clock=clock.clock, rng=rng or MaxRandom(), **kw)


def test_transient_failures_are_retried_with_capped_exponential_backoff():
    t = FakeTime()
    fn = Flaky(C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.UNAVAILABLE, C.UNAVAILABLE, C.UNAVAILABLE)
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, multiplier=2.0, max_attempts=None, max_elapsed=None)

    result = invoker(policy, t).call(fn, "request", timeout=3)

    assert result == "ok"
    assert fn.calls == 6
    assert t.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "code",
    [
        C.UNAUTHENTICATED,
        C.PERMISSION_DENIED,
        C.INVALID_ARGUMENT,
        C.ALREADY_EXISTS,
        C.INTERNAL,
        C.RESOURCE_EXHAUSTED,
    ],
)
def test_other_failures_fail_fast(code):
    t = FakeTime()
    fn = Flaky(code)

    with pytest.raises(grpc.RpcError) as info:
        invoker(RetryPolicy(), t).call(fn)

    assert info.value.code() == code
    assert fn.calls == 1
    assert t.sleeps == []


def test_resource_exhausted_is_retried_when_asked():
    t = FakeTime()
    fn = Flaky(C.RESOURCE_EXHAUSTED)

    assert invoker(RetryPolicy(retry_resource_exhausted=True), t).call(fn) == "ok"
    assert fn.calls == 2


def test_gives_up_after_max_attempts_with_the_last_error():
    t = FakeTime()
    fn = Flaky(C.UNAVAILABLE, C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.UNAVAILABLE)

    with pytest.raises(grpc.RpcError) as info:
        invoker(RetryPolicy(base_delay=1.0, max_attempts=3, max_elapsed=None), t).call(fn)

    assert info.value.code() == C.DEADLINE_EXCEEDED
    assert fn.calls == 3
    assert len(t.sleeps) == 2


def test_gives_up_before_a_sleep_that_would_pass_max_elapsed():
    t = FakeTime()
    fn = Flaky(*[C.UNAVAILABLE] * 10)
    policy = RetryPolicy(base_delay=1.0, max_delay=100.0, max_attempts=None, max_elapsed=10.0)

    with pytest.raises(grpc.RpcError):
        invoker(policy, t).call(fn)

    assert t.sleeps == [1.0, 2.0, 4.0]  # 7 s slept; another 8 s would end at 15 s
    assert fn.calls == 4


def test_full_jitter_stays_within_the_cap():
    t = FakeTime()
    fn = Flaky(*[C.UNAVAILABLE] * 30)
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, max_attempts=None, max_elapsed=None)

    invoker(policy, t, rng=random.Random(7)).call(fn)

    caps = [min(4.0, 0.5 * 2**n) for n in range(30)]
    assert all(0.0 <= s <= cap for s, cap in zip(t.sleeps, caps, strict=True))
    assert len(set(t.sleeps)) == 30  # random, not fixed


def test_on_retry_sees_each_retry():
    t = FakeTime()
    events: list[RetryEvent] = []

    invoker(RetryPolicy(base_delay=1.0), t, on_retry=events.append).call(Flaky(C.UNAVAILABLE, C.UNAVAILABLE))

    assert [(e.attempt, e.code, e.details, e.delay, e.elapsed) for e in events] == [
        (1, C.UNAVAILABLE, "boom", 1.0, 0.0),
        (2, C.UNAVAILABLE, "boom", 2.0, 1.0),
    ]


def test_non_grpc_errors_propagate_untouched():
    t = FakeTime()

    def broken():
        raise KeyError("x")

    with pytest.raises(KeyError):
        invoker(RetryPolicy(), t).call(broken)
    assert t.sleeps == []


def test_status_code_of_a_bare_rpc_error_is_none():
    assert status_code(grpc.RpcError()) is None
    assert status_code(ValueError()) is None
    assert status_code(FakeRpcError(C.UNAVAILABLE)) == C.UNAVAILABLE


@pytest.mark.parametrize(
    "kwargs",
    [{"base_delay": -1}, {"base_delay": 2, "max_delay": 1}, {"multiplier": 0.5}, {"max_attempts": 0}],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_retries_a_real_unavailable_channel():
    t = FakeTime()
    channel = grpc.insecure_channel("127.0.0.1:1")  # nothing listens on port 1
    fn = channel.unary_unary("/x.Y/Z")

    with pytest.raises(grpc.RpcError) as info:
        invoker(RetryPolicy(base_delay=0.0, max_attempts=2), t).call(fn, b"", timeout=2)

    channel.close()
    assert info.value.code() == C.UNAVAILABLE
    assert t.sleeps == [0.0]
