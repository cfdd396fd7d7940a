"""Child processes of the harness: each in its own process group, stopped by group, and every one
still running stopped when this interpreter exits."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LISTENING = "listening on port"  # a service's first stdout line ends "listening on port N"
STOP_GRACE_S = 10.0  # SIGTERM, then this long to drain, then SIGKILL

_live: list[subprocess.Popen] = []  # children not yet stopped; the atexit hook stops what is left


class HarnessError(RuntimeError):
    """A step or a process failed; the message says which and where its log is."""


def run_command(cmd: Sequence[str], log: Path | None = None) -> str:
    """Run a command to completion; its output goes to ``log`` (if given) and is returned.

    Raises:
        HarnessError: the command exited with a non-zero status (the message ends with its stderr).
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise HarnessError(f"{_named(cmd)} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def _named(cmd: Sequence[str]) -> str:
    """A command's first words, to name it in a message."""
    return " ".join(map(str, cmd[:4]))


def spawn(cmd: Sequence[str], log: Path | None, pipe_stdout: bool = False) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (session), unbuffered; stdout and stderr are appended
    to ``log`` (None: inherited), except that ``pipe_stdout`` keeps stdout as a text pipe."""
    _stop_all_at_exit()
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
    with out if out is not None else contextlib.nullcontext():  # the child holds its own copy
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE if pipe_stdout else out,
            stderr=out if pipe_stdout or out is None else subprocess.STDOUT,
            text=pipe_stdout,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _live.append(proc)
    return proc


@functools.cache
def _stop_all_at_exit() -> None:
    """Register stop_all with atexit, once per process."""
    atexit.register(stop_all)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal ``proc``'s process group while ``proc`` is unreaped (so its pid cannot be reused)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace_s``; returns the exit status."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    return _forget(proc)


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc``'s process group at once (a crash, nothing graceful); returns the exit status."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    return _forget(proc)


def _forget(proc: subprocess.Popen) -> int:
    """Close ``proc``'s pipe and drop it from the children still to stop."""
    if proc.stdout is not None:
        proc.stdout.close()
    with contextlib.suppress(ValueError):
        _live.remove(proc)
    return proc.returncode


def stop_many(procs: Sequence[subprocess.Popen]) -> None:
    """Stop ``procs`` together: SIGTERM to every group first, then wait for each (SIGKILL the slow)."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    for proc in procs:
        stop(proc)


def stop_all() -> None:
    """Stop every child this process started and has not stopped yet."""
    stop_many(list(_live))


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt (SIGINT even where it was ignored, as in a
    background job), so that ``finally`` blocks and the atexit hook stop the children."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


@dataclass
class Service:
    """A child whose first stdout line said "listening on port N"."""

    popen: subprocess.Popen
    port: int
    log: Path | None

    @property
    def pid(self) -> int:
        """The child's process id (and its process group's)."""
        return self.popen.pid

    def stop(self) -> int:
        """SIGTERM (a graceful drain), then SIGKILL; returns the exit status."""
        return stop(self.popen)

    def kill(self) -> int:
        """SIGKILL, and reap; returns the exit status."""
        return kill(self.popen)


def start_service(cmd: Sequence[str], log: Path | None) -> Service:
    """Start ``cmd`` (stderr to ``log``) and wait until it prints that it listens, and on which port.

    Raises:
        HarnessError: it exited or printed something else first (the message ends with its log).
    """
    proc = spawn(cmd, log, pipe_stdout=True)
    line = proc.stdout.readline()
    if LISTENING not in line:
        stop(proc)
        said = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise HarnessError(f"{_named(cmd)} did not start ({line.strip()!r}); see {log}:\n{said}")
    return Service(proc, int(line.rsplit(" ", 1)[1]), log)
