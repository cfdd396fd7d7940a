"""The round clock survives a failing tick and logs a repeating failure once, not every tick."""

from __future__ import annotations

import logging
import time


def test_a_repeating_clock_failure_is_logged_once_and_recovery_noted(serve, caplog) -> None:
    running = serve()
    federation = running.federation
    real_tick = federation._tick
    calls = []

    def failing_tick() -> None:
        calls.append(time.monotonic())
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.INFO, logger="aggregator.coordinator"):
        federation._tick = failing_tick
        deadline = time.monotonic() + 10
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        federation._tick = real_tick
        time.sleep(0.6)  # a few good ticks
    assert len(calls) >= 5
    failures = [r for r in caplog.records if "round clock failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert [r for r in caplog.records if r.getMessage() == "round clock recovered"]
