"""Progress of long loops: a tqdm bar on a terminal, a log line every N steps (or S seconds) otherwise.

Progress bars are for people, log lines for machines: ``mode="auto"`` draws a bar when stderr is a
terminal and logs otherwise (a log file, a pipe, CI). Everything goes to stderr, never to stdout,
so commands that print JSON keep it parseable. Torch-free, so experiments and benchmarks use it too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "none")
EVERY_STEPS = 50  # a log line every 50 steps ...
EVERY_S = 30.0  # ... or sooner, once 30 s have passed since the last one with progress in between


def resolve_mode(mode: str) -> str:
    """``auto`` → ``bar`` when stderr is a terminal, else ``log``; other modes as they are.

    Raises:
        ValueError: ``mode`` is not one of MODES.
    """
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def clock(seconds: float) -> str:
    """``seconds`` as M:SS or H:MM:SS, the way tqdm shows times."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Reports a loop of ``total`` steps (None: unknown): a bar, log lines, or nothing (see MODES).

    ``unit`` names a step in the lines ("step", "image", "round"); ``rate_unit`` names what
    ``update(items=...)`` counts (one a step unless given), shown as a rate ("images" →
    "123.4 images/s"; None: no rate).
    In log mode a line (step/total, mean loss so far, rate, elapsed, ETA) is logged once ``every``
    steps or ``every_s`` seconds have passed since the last one, and only when steps were made.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "step",
        rate_unit: str | None = None,
        mode: str = "auto",
        every: int = EVERY_STEPS,
        every_s: float = EVERY_S,
        initial: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"progress every must be >= 1 step, got {every}")
        self.total, self.desc, self.unit, self.rate_unit = total, desc, unit, rate_unit
        self.mode = resolve_mode(mode)
        self.every, self.every_s = every, every_s
        self.initial = self.done = self._logged = initial
        self.items = 0
        self._loss_sum, self._loss_weight = 0.0, 0
        self.log = logger or log
        self.started = self._logged_at = time.perf_counter()
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()
        if self.mode == "bar":
            from tqdm import tqdm  # imported only for a bar: log mode needs nothing beyond the stdlib
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                             dynamic_ncols=True, leave=True)  # fmt: skip
            # log lines printed while the bar is up go above it instead of through it
            self._redirect.enter_context(logging_redirect_tqdm())

    @property
    def loss(self) -> float | None:
        """The mean loss of the steps so far (weighted by items where given); None without any."""
        return self._loss_sum / self._loss_weight if self._loss_weight else None

    def update(self, steps: int = 1, *, items: int | None = None, loss: float | None = None) -> None:
        """``steps`` more steps done, covering ``items`` items (default: one a step), with mean ``loss``."""
        items = steps if items is None else items
        self.done += steps
        self.items += items
        if loss is not None:
            weight = items if items else max(steps, 1)
            self._loss_sum += loss * weight
            self._loss_weight += weight
        if self._bar is not None:
            postfix = ", ".join(self._measures(with_times=False))
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(steps)
        elif self.mode == "log" and self.done > self._logged:
            now = time.perf_counter()
            if self.done - self._logged >= self.every or now - self._logged_at >= self.every_s:
                self._logged, self._logged_at = self.done, now
                self.log.info("%s", self.line())

    def update_to(self, done: int) -> None:
        """Bring the count of steps done up to ``done`` (a watcher's view of another process)."""
        if done > self.done:
            self.update(done - self.done)

    def line(self) -> str:
        """The log line: where, step/total, loss, rate, elapsed and ETA."""
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        return f"{self.desc}: {self.unit} {count}, " + ", ".join(self._measures(with_times=True))

    def _measures(self, with_times: bool) -> list[str]:
        elapsed = time.perf_counter() - self.started
        parts = [] if self.loss is None else [f"loss {self.loss:.4f}"]
        if self.rate_unit is not None and (with_times or self.rate_unit != f"{self.unit}s"):
            # a bar shows steps/s itself: "images/s" beside "image/s" would say it twice
            parts.append(f"{self.items / elapsed if elapsed > 0 else 0.0:.1f} {self.rate_unit}/s")
        if with_times:
            parts.append(f"elapsed {clock(elapsed)}")
            made = self.done - self.initial
            if self.total is not None and made > 0:
                parts.append(f"ETA {clock(max(self.total - self.done, 0) * elapsed / made)}")
        return parts

    def close(self) -> None:
        """End the bar (it stays on screen); log mode says nothing more."""
        if self._bar is not None:
            self._redirect.close()
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``--progress {auto,bar,log,none}`` and ``--progress-every N`` on a command's parser."""
    parser.add_argument("--progress", choices=MODES, default="auto",
                        help="a bar (on a terminal, the default), log lines (otherwise), or none")
    parser.add_argument("--progress-every", type=int, default=EVERY_STEPS, metavar="N",
                        help=f"log a progress line every N steps (default {EVERY_STEPS}; "
                             f"at least every {EVERY_S:.0f} s)")  # fmt: skip


def count_lines(path: Path, marker: str) -> int:
    """How many lines of the text file ``path`` contain ``marker`` (0 when it does not exist yet)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return sum(marker in line for line in f)
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def watch(
    count: Callable[[], int],
    total: int | None,
    desc: str,
    *,
    unit: str = "step",
    mode: str = "auto",
    poll_s: float = 5.0,
) -> Iterator[Progress]:
    """Report what ``count()`` says is done (polled every ``poll_s`` seconds) while the block waits.

    For work another process does (a training, a federation) that the caller sees only through
    its files: a line for each unit it finishes, or a bar.
    """
    progress = Progress(total, desc, unit=unit, mode=mode, every=1, initial=count())
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            progress.update_to(count())

    thread = threading.Thread(target=poll, name=f"progress {desc}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
        progress.update_to(count())
        progress.close()
