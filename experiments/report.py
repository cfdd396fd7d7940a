"""Turn the per-run result files of the miniature experiments into ``docs/results.md`` and Fig. 3.

Each run (one model trained one way: alone on one edge's shard, centrally on all data, or
federated) leaves one JSON file in a results folder, next to a ``meta.json`` that describes the
setup. This module only reads those files and formats them: the analogues of the paper's Table 1
(model size and upload per round), Table 2 (accuracy per test set and manner) and Fig. 3 (accuracy
against uploaded megabytes). matplotlib is imported only when the figure is drawn.

Sizes are in MB = 10^6 bytes; accuracies in the files are fractions, shown here in per cent, and
1-NED (``char_accuracy``) is shown as a fraction with three decimals.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.scales import MANNERS, MODELS, TEST_SETS

# Models, manners and test sets are the experiment's own (experiments/scales.py).
MODEL_ORDER = tuple(m.id for m in MODELS)
MODEL_LABELS = {m.id: m.label for m in MODELS}
# The paper's benchmark each synthetic test set stands in for.
PAPER_ANALOGUE = {
    "clean": "IIIT5k/IC13",
    "lowres": "SVT",
    "blur": "IC15",
    "perspective": "SVTP",
    "curved": "CUTE",
    "noisy": "IC15",
}
# The paper's Table 1: (params in M, param reduction vs ASTER-FL in %, mean accuracy in %).
PAPER_TABLE1: dict[str, tuple[float, float | None, float]] = {
    "aster-fl": (20.99, None, 91.94),
    "fedocr-hash-1": (13.34, 36.45, 89.08),
    "fedocr-hash-1/2": (6.70, 68.08, 86.65),
    "fedocr-hash-1/4": (3.38, 83.90, 85.39),
    "fedocr-hash-1/8": (1.72, 91.81, 82.58),
}
REQUIRED_KEYS = ("model", "manner", "accuracy")
META_FILE = "meta.json"
BASELINE = "aster-fl"
DASH = "–"
MB = 1e6
# Acc_FED counts as matching Acc_SUM when within this many points (1-NED: the same on a 0-100 scale).
WITHIN_PT = 0.5
# Below this mean word accuracy a model is at or near its initial plateau: it does not read yet,
# so comparing its accuracy with another manner's tests nothing about federated learning.
READING_FLOOR = 0.30
NOT_READING = "not reading"


# -- loading -------------------------------------------------------------------------------------------


def _load_named(results_dir: Path) -> list[tuple[str, dict]]:
    """(file name, run) for every run file in ``results_dir``, sorted by file name."""
    named = []
    for path in sorted(Path(results_dir).glob("*.json"), key=lambda p: p.name):
        if path.name == META_FILE:
            continue
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(run, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(run).__name__}")
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
    return [run for _, run in _load_named(results_dir)]


def _load_meta(results_dir: Path) -> dict:
    """``meta.json`` of ``results_dir``, or {} when there is none."""
    path = Path(results_dir) / META_FILE
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


# -- small helpers -------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, null, not a number, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted with ``spec``, or a dash when there is no number."""
    number = _num(value)
    if number is None:
        return DASH
    return format(number * scale + 0.0, spec)  # + 0.0: no "-0.0"


def _signed(value: float | None, decimals: int) -> str:
    """``+1.2`` / ``-0.3`` / ``+0.0`` (never ``-0.0``), or a dash."""
    if value is None:
        return DASH
    return format(round(value, decimals) + 0.0, f"+.{decimals}f")


def _yes_no(flag: bool | None) -> str:
    return DASH if flag is None else ("yes" if flag else "no")


def _text(value: Any) -> str:
    """A meta or run field as table text: a dash for missing, pipes escaped."""
    if value is None or value == "" or value == [] or value == {}:
        return DASH
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def _label(model: str, runs: Iterable[dict] = ()) -> str:
    if model in MODEL_LABELS:
        return MODEL_LABELS[model]
    for run in runs:
        if run.get("model") == model and run.get("label"):
            return str(run["label"])
    return model


def _models(runs: list[dict]) -> list[str]:
    """The models present: MODEL_ORDER first, then any others sorted by id."""
    present = {str(run["model"]) for run in runs}
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def _index(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(model, manner) -> run; a later run of the same pair replaces an earlier one."""
    return {(str(run["model"]), str(run["manner"])): run for run in runs}


def _set_metric(run: dict, test_set: str, metric: str) -> float | None:
    entry = run.get("accuracy", {}).get(test_set)
    return _num(entry.get(metric)) if isinstance(entry, dict) else None


def _mean(run: dict | None, metric: str) -> float | None:
    """A run's mean ``metric`` (``accuracy`` or ``char_accuracy``) as a fraction.

    Uses the run's ``mean_<metric>`` when present, else the mean over the test sets it has."""
    if run is None:
        return None
    stored = _num(run.get(f"mean_{metric}"))
    if stored is not None:
        return stored
    values = [v for s in TEST_SETS if (v := _set_metric(run, s, metric)) is not None]
    return sum(values) / len(values) if values else None


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A Markdown table; ``align`` holds "l" or "r" per column (default: first left, rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]]
    return "\n".join(lines) + "\n"


def _representative(index: dict[tuple[str, str], dict], model: str) -> dict:
    """The run whose model-level fields (params, backbone, γ, file size) a Table 1 row shows."""
    for manner in ("federated", "centralized", "single"):
        if (model, manner) in index:
            return index[(model, manner)]
    return next(run for (m, _), run in index.items() if m == model)


def _clock(seconds: float | None) -> str:
    """``m:ss`` (minutes may exceed 59), or a dash."""
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


def _hms(seconds: float | None) -> str:
    """``h:mm:ss``, or a dash."""
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


# -- tables --------------------------------------------------------------------------------------------


def table1(runs: list[dict]) -> str:
    """The analogue of the paper's Table 1: size, upload per round and accuracy per model.

    Param reduction is ``100 * (1 - real / real of ASTER-FL)`` (a dash without an ASTER-FL run);
    upload and accuracy come from the model's federated run (dashes without one).
    """
    index = _index(runs)
    base = None
    if any(m == BASELINE for m, _ in index):
        base = _num(_representative(index, BASELINE).get("params", {}).get("real"))
    header = [
        "Model",
        "Backbone",
        "γ",
        "Params (real, M)",
        "reduction vs ASTER-FL",
        "Model file (MB)",
        "Upload per edge per round (MB, raw / wire)",
        "Mean accuracy (%) (federated)",
        "Paper: params (M) / reduction / accuracy (%)",
    ]
    rows = []
    for model in _models(runs):
        rep = _representative(index, model)
        params = rep.get("params") if isinstance(rep.get("params"), dict) else {}
        real = _num(params.get("real"))
        if base and real is not None:
            reduction = f"{100.0 * (1.0 - real / base) + 0.0:.2f} %"
        else:
            reduction = DASH
        fed = index.get((model, "federated"))
        upload = fed.get("upload") if fed is not None and isinstance(fed.get("upload"), dict) else None
        if upload is not None:
            raw = _fmt(upload.get("raw_bytes_per_edge_per_round"), ".3f", 1 / MB)
            wire = _fmt(upload.get("wire_bytes_per_edge_per_round"), ".3f", 1 / MB)
            upload_text = f"{raw} / {wire}"
        else:
            upload_text = DASH
        paper = PAPER_TABLE1.get(model)
        if paper is not None:
            p_params, p_reduction, p_acc = paper
            p_red = DASH if p_reduction is None else f"{p_reduction:.2f} %"
            paper_text = f"{p_params:.2f} / {p_red} / {p_acc:.2f}"
        else:
            paper_text = DASH
        rows.append(
            [
                _label(model, runs),
                _text(rep.get("backbone")),
                _text(rep.get("gamma")),
                _fmt(real, ".3f", 1 / MB),
                reduction,
                _fmt(rep.get("model_file_bytes"), ".2f", 1 / MB),
                upload_text,
                _fmt(_mean(fed, "accuracy"), ".1f", 100.0),
                paper_text,
            ]
        )
    return _table(header, rows, ["l", "l", "l", "r", "r", "r", "r", "r", "r"])


def paper_size_table(meta: dict) -> str:
    """The paper-size presets counted (not trained): parameters, upload per round and the reduction
    against ASTER-FL, next to the paper's reductions. Reads ``meta["paper_size"]``."""
    sizes = meta.get("paper_size")
    if not isinstance(sizes, dict) or not sizes:
        return DASH + "\n"
    base = _num(sizes.get(BASELINE, {}).get("real_params"))
    header = ["Model", "Preset", "γ", "Params (real, M)", "Upload per round (MB, raw)",
              "reduction vs ASTER-FL", "Paper: params (M) / reduction"]  # fmt: skip
    rows = []
    for model in [m for m in MODEL_ORDER if m in sizes]:
        size = sizes[model]
        real = _num(size.get("real_params"))
        reduction = f"{100.0 * (1.0 - real / base):.2f} %" if base and real is not None else DASH
        paper = PAPER_TABLE1.get(model)
        paper_text = DASH
        if paper is not None:
            paper_text = f"{paper[0]:.2f} / " + (DASH if paper[1] is None else f"{paper[1]:.2f} %")
        rows.append([_label(model), _text(size.get("preset")), _text(size.get("gamma")),
                     _fmt(real, ".3f", 1 / MB), _fmt(size.get("state_bytes"), ".2f", 1 / MB), reduction,
                     paper_text])  # fmt: skip
    return _table(header, rows, ["l", "l", "l", "r", "r", "r", "r"])


def _comparisons(runs: list[dict]) -> str:
    """Per model: Acc_FED − Acc_SUM and single < federated, on word accuracy and on 1-NED."""
    index = _index(runs)
    header = [
        "Model",
        "Acc_FED − Acc_SUM (pt)",
        f"within {WITHIN_PT} pt",
        "single < federated",
        "1-NED: FED − SUM",
        f"1-NED within {WITHIN_PT / 100:.3f}",
        "1-NED: single < federated",
    ]
    rows = []
    for model in _models(runs):
        cells = [_label(model, runs)]
        for metric, scale, decimals in (("accuracy", 100.0, 1), ("char_accuracy", 1.0, 3)):
            fed = _mean(index.get((model, "federated")), metric)
            central = _mean(index.get((model, "centralized")), metric)
            single = _mean(index.get((model, "single")), metric)
            diff = None if fed is None or central is None else (fed - central) * scale
            within = None if diff is None else abs(diff) <= WITHIN_PT * scale / 100.0 + 1e-12
            beaten = None if fed is None or single is None else single < fed
            within_cell, beaten_cell = _yes_no(within), _yes_no(beaten)
            if metric == "accuracy":  # word accuracy compares only models that read
                if within is not None and min(fed, central) < READING_FLOOR:
                    within_cell = NOT_READING
                if beaten is not None and fed < READING_FLOOR:
                    beaten_cell = NOT_READING
            cells += [_signed(diff, decimals), within_cell, beaten_cell]
        rows.append(cells)
    note = (
        f"\n{NOT_READING}: the federated (or, for FED − SUM, the centralized) model's mean word accuracy "
        f"is below {READING_FLOOR:.0%}, at or near its initial plateau, so that word-accuracy check "
        "tests nothing yet.\n"
    )
    return _table(header, rows, ["l", "r", "l", "l", "r", "l", "l"]) + note


def table2(runs: list[dict]) -> str:
    """The analogue of the paper's Table 2, then the federated-vs-centralized/single checks.

    The first table has one row per (model, manner) present: word accuracy (%) per test set, the
    mean, and mean 1-NED. The second has, per model, Acc_FED − Acc_SUM in points (federated mean
    minus centralized mean) with whether it is within 0.5 pt, whether single < federated, and the
    same on mean 1-NED, which still moves when word accuracy is near zero at small scale. A word
    accuracy check whose federated (or centralized) model is below READING_FLOOR says "not reading".
    """
    index = _index(runs)
    header = ["Model", "Manner", *TEST_SETS, "Mean", "1-NED mean"]
    rows = []
    for model in _models(runs):
        manners = [m for m in MANNERS if (model, m) in index]
        manners += sorted(m for (mod, m) in index if mod == model and m not in MANNERS)
        for manner in manners:
            run = index[(model, manner)]
            rows.append(
                [
                    _label(model, runs),
                    manner,
                    *(_fmt(_set_metric(run, s, "accuracy"), ".1f", 100.0) for s in TEST_SETS),
                    _fmt(_mean(run, "accuracy"), ".1f", 100.0),
                    _fmt(_mean(run, "char_accuracy"), ".3f"),
                ]
            )
    main = _table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2))
    return main + "\n" + _comparisons(runs)


def _analogue_sentence() -> str:
    pairs = ", ".join(f"{name} ≈ {PAPER_ANALOGUE[name]}" for name in TEST_SETS)
    return f"The synthetic test sets stand in for the paper's benchmarks: {pairs}."


# -- figure --------------------------------------------------------------------------------------------


def plot_fig3(runs: list[dict], out_png: Path) -> None:
    """Fig. 3 analogue: clean accuracy (%) and clean 1-NED against cumulative raw MB uploaded per
    edge, one line per model, from the federated runs' ``curve``; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = _index(runs)
    fig = Figure(figsize=(11.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_ned = fig.subplots(1, 2)
    drawn = 0
    for model in _models(runs):
        run = index.get((model, "federated"))
        curve = run.get("curve") if run is not None else None
        if not isinstance(curve, list) or not curve:
            continue
        points = [p for p in curve if isinstance(p, dict)]
        points.sort(key=lambda p: _num(p.get("round")) or 0.0)
        x = [_num(p.get("upload_mb_per_edge")) for p in points]
        acc = [_num(p.get("clean_accuracy")) for p in points]
        ned = [_num(p.get("clean_char_accuracy")) for p in points]
        label = _label(model, runs)
        xy_acc = [(a, b * 100.0) for a, b in zip(x, acc, strict=True) if a is not None and b is not None]
        xy_ned = [(a, b) for a, b in zip(x, ned, strict=True) if a is not None and b is not None]
        if xy_acc:
            ax_acc.plot(*zip(*xy_acc, strict=True), marker="o", label=label)
        if xy_ned:
            ax_ned.plot(*zip(*xy_ned, strict=True), marker="o", label=label)
        drawn += bool(xy_acc or xy_ned)
    ax_acc.set_xlabel("cumulative upload per edge (MB, raw)")
    ax_acc.set_ylabel("word accuracy on clean (%)")
    ax_ned.set_xlabel("cumulative upload per edge (MB, raw)")
    ax_ned.set_ylabel("1-NED on clean")
    for ax in (ax_acc, ax_ned):
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no federated runs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Fig. 3 analogue")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")


# -- the report ----------------------------------------------------------------------------------------


def _lr_schedule(meta: dict) -> str:
    lr = _num(meta.get("lr"))
    if lr is None:
        return DASH
    rounds = meta.get("lr_decay_rounds") or []
    factors = meta.get("lr_decay_factors") or []
    if not isinstance(rounds, list) or not isinstance(factors, list):
        return f"{lr:g}"
    steps = [f"×{f:g} from round {r} on" for r, f in zip(rounds, factors, strict=False)]
    cosine = meta.get("lr_cosine_from_round")
    if isinstance(cosine, int) and cosine:
        steps.append(f"falling along a cosine from round {cosine} to 1% at the end of the last")
    text = f"{meta.get('optimizer', 'adadelta')} lr {lr:g}"
    text += ", " + ", ".join(steps) if steps else " (constant)"
    epochs = meta.get("lr_decay_epochs")
    if isinstance(epochs, list) and epochs:
        text += " (single and centralized: from epoch " + ", ".join(str(e + 1) for e in epochs) + ")"
    cosine_epoch = meta.get("lr_cosine_from_epoch")
    if isinstance(cosine_epoch, int) and cosine:
        text += f" (single and centralized: the same cosine over epochs, from epoch {cosine_epoch + 1})"
    return text


def _pretraining(meta: dict) -> str:
    pre = meta.get("pretrain")
    if not isinstance(pre, dict):
        return "none (every manner starts from the key's W_0)"
    source = meta.get("pretrained_from")
    whose = f" (scale {source}'s pretrained models, the same files)" if isinstance(source, str) else ""
    return (f"{_text(pre.get('words'))} {_text(pre.get('styles'))}-style words of another seed, "
            f"{_text(pre.get('epochs'))} epochs{whose}; every manner starts from that model")  # fmt: skip


def _setup(meta: dict, runs: list[dict]) -> str:
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    presets = meta.get("presets") if isinstance(meta.get("presets"), dict) else {}
    preset_text = ", ".join(f"{k}: {v}" for k, v in presets.items()) if presets else DASH
    walls = [w for run in runs if (w := _num(run.get("wall_s"))) is not None]
    runs_wall = _hms(sum(walls)) if walls else DASH
    lines = [
        f"- Machine: {_text(meta.get('machine'))}",
        f"- Scale: {_text(meta.get('scale'))}",
        f"- Training words: {_text(data.get('train_words'))}; test words per set: "
        f"{_text(data.get('test_words_per_set'))} ({len(TEST_SETS)} test sets)",
        f"- Labels: {_text(meta.get('labels'))}; styles: {_text(data.get('styles'))}",
        f"- Edges: {_text(data.get('edges'))}; data seed: {_text(data.get('seed'))}",
        f"- Rounds: {_text(meta.get('rounds'))}; local epochs per round: {_text(meta.get('local_epochs'))}; "
        f"batch size: {_text(meta.get('batch_size'))}",
        f"- Learning rate: {_lr_schedule(meta)}",
        f"- Pretraining: {_pretraining(meta)}",
        f"- Presets: {preset_text}; beam width of the final evaluation: {_text(meta.get('beam'))}; "
        f"torch threads per process: {_text(meta.get('threads_per_process'))}",
        f"- Wall time: {runs_wall} summed over {len(walls)} runs; whole experiment: "
        f"{_hms(_num(meta.get('wall_s')))}",
    ]
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path, docs_md: Path, fig_png: Path, preamble: str = "") -> None:
    """Write the Markdown report of ``results_dir`` to ``docs_md`` and its Fig. 3 to ``fig_png``.

    ``preamble`` (the caller's prose) goes verbatim after the title. Missing meta fields show as
    dashes. Raises ValueError (from :func:`load_runs`) on a broken run file.
    """
    results_dir, docs_md, fig_png = Path(results_dir), Path(docs_md), Path(fig_png)
    named = _load_named(results_dir)
    runs = [run for _, run in named]
    meta = _load_meta(results_dir)
    scale = meta.get("scale") or next((run["scale"] for run in runs if run.get("scale")), None)

    plot_fig3(runs, fig_png)
    link = Path(os.path.relpath(fig_png.resolve(), docs_md.resolve().parent)).as_posix()

    parts = [f"# Results: the paper's experiments in miniature (scale {_text(scale)})\n"]
    if preamble:
        parts.append(preamble if preamble.endswith("\n") else preamble + "\n")
    parts.append("## Setup\n\n" + _setup(meta, runs))
    parts.append(
        "## Table 1 analogue\n\n"
        "Real parameters are the floats a model stores (for hashed models, the real vectors behind\n"
        "the virtual weights); MB = 10^6 bytes. Upload per round is one edge's increment, raw and as\n"
        "sent on the wire. Paper figures are the paper's Table 1, for comparison of trends only.\n\n"
        + table1(runs)
    )
    parts.append(
        "### The paper-size models, counted\n\n"
        "The byte reduction by γ at the paper's widths (ASTER-FL and FedOCR presets), from the\n"
        "parameter counts of the real vectors; an upload is every real parameter and batch-norm\n"
        "value as float32 (MB = 10^6 bytes).\n\n" + paper_size_table(meta)
    )
    parts.append(
        "## Table 2 analogue\n\n"
        + _analogue_sentence()
        + " Word accuracy in %; 1-NED is 1 − normalized edit distance (mean over the test sets).\n\n"
        + table2(runs)
    )
    parts.append(f"## Fig. 3 analogue\n\n![Fig. 3 analogue]({link})\n")
    run_lines = [
        f"- `{name}`: {_clock(_num(run.get('wall_s')))} on {_text(run.get('machine'))}" for name, run in named
    ]
    parts.append("## Runs\n\n" + ("\n".join(run_lines) if run_lines else DASH) + "\n")

    docs_md.parent.mkdir(parents=True, exist_ok=True)
    docs_md.write_text("\n".join(parts), encoding="utf-8")
