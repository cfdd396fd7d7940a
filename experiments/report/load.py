"""Loading and validating an experiment's results folder: one JSON file per run beside ``meta.json``."""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_KEYS = ("model", "manner", "accuracy")
META_FILE = "meta.json"


def _read_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or no object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_named(results_dir: Path) -> list[tuple[str, dict]]:
    """(file name, run) for every run file in ``results_dir``, sorted by file name."""
    named = []
    for path in sorted(Path(results_dir).glob("*.json"), key=lambda p: p.name):
        if path.name == META_FILE:
            continue
        run = _read_object(path)
        missing = [key for key in REQUIRED_KEYS if key not in run]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
        if not isinstance(run["accuracy"], dict):
            raise ValueError(f"{path}: 'accuracy' must be an object keyed by test set")
        named.append((path.name, run))
    return named


def load_runs(results_dir: Path) -> list[dict]:
    """Every ``*.json`` run in ``results_dir`` except ``meta.json``, sorted by file name.

    Raises:
        ValueError: a file is not valid JSON or lacks ``model``, ``manner`` or ``accuracy``; the
            message names the file.
    """
    return [run for _, run in load_named(results_dir)]


def load_meta(results_dir: Path) -> dict:
    """``meta.json`` of ``results_dir``, or {} when there is none."""
    path = Path(results_dir) / META_FILE
    return _read_object(path) if path.exists() else {}
