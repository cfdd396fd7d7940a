"""The report's cells: numbers, dashes and labels as table text, the runs looked up by model and manner.

Sizes are in MB = 10^6 bytes; accuracies in the run files are fractions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from experiments.scales import MODELS, TEST_SETS

# Models, manners and test sets are the experiment's own (experiments/scales.py).
MODEL_ORDER = tuple(m.id for m in MODELS)
MODEL_LABELS = {m.id: m.label for m in MODELS}
DASH = "–"
MB = 1e6


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, null, not a number, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted with ``spec``, or a dash when there is no number."""
    number = finite(value)
    if number is None:
        return DASH
    return format(number * scale + 0.0, spec)  # + 0.0: no "-0.0"


def signed(value: float | None, decimals: int) -> str:
    """``+1.2`` / ``-0.3`` / ``+0.0`` (never ``-0.0``), or a dash."""
    if value is None:
        return DASH
    return format(round(value, decimals) + 0.0, f"+.{decimals}f")


def yes_no(flag: bool | None) -> str:
    """``yes`` / ``no``, or a dash when there is no answer."""
    return DASH if flag is None else ("yes" if flag else "no")


def cell_text(value: Any) -> str:
    """A meta or run field as table text: a dash for missing, pipes escaped."""
    if value is None or value == "" or value == [] or value == {}:
        return DASH
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def model_label(model: str, runs: Iterable[dict] = ()) -> str:
    """The paper's name of a model (MODEL_LABELS), else a run's ``label``, else the id."""
    if model in MODEL_LABELS:
        return MODEL_LABELS[model]
    for run in runs:
        if run.get("model") == model and run.get("label"):
            return str(run["label"])
    return model


def models_present(runs: list[dict]) -> list[str]:
    """The models present: MODEL_ORDER first, then any others sorted by id."""
    present = {str(run["model"]) for run in runs}
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def by_pair(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(model, manner) -> run; a later run of the same pair replaces an earlier one."""
    return {(str(run["model"]), str(run["manner"])): run for run in runs}


def set_metric(run: dict, test_set: str, metric: str) -> float | None:
    """A run's ``metric`` on one test set, or None when it has none."""
    entry = run.get("accuracy", {}).get(test_set)
    return finite(entry.get(metric)) if isinstance(entry, dict) else None


def mean_metric(run: dict | None, metric: str) -> float | None:
    """A run's mean ``metric`` (``accuracy`` or ``char_accuracy``) as a fraction.

    Uses the run's ``mean_<metric>`` when present, else the mean over the test sets it has."""
    if run is None:
        return None
    stored = finite(run.get(f"mean_{metric}"))
    if stored is not None:
        return stored
    values = [v for s in TEST_SETS if (v := set_metric(run, s, metric)) is not None]
    return sum(values) / len(values) if values else None


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A Markdown table; ``align`` holds "l" or "r" per column (default: first left, rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]]
    return "\n".join(lines) + "\n"


def representative(index: dict[tuple[str, str], dict], model: str) -> dict:
    """The run whose model-level fields (params, backbone, γ, file size) a Table 1 row shows."""
    for manner in ("federated", "centralized", "single"):
        if (model, manner) in index:
            return index[(model, manner)]
    return next(run for (m, _), run in index.items() if m == model)


def clock(seconds: float | None) -> str:
    """``m:ss`` (minutes may exceed 59), or a dash."""
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


def hms(seconds: float | None) -> str:
    """``h:mm:ss``, or a dash."""
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
