"""The report itself: the setup in prose, then the tables, the figure and the runs, as one Markdown file."""

from __future__ import annotations

import os
from pathlib import Path

from experiments.report.cells import DASH, cell_text, clock, finite, hms
from experiments.report.figure import plot_fig3
from experiments.report.load import load_meta, load_named
from experiments.report.tables import analogue_sentence, paper_size_table, table1, table2
from experiments.scales import TEST_SETS


def lr_schedule(meta: dict) -> str:
    """The learning-rate plan of ``meta`` in words: optimizer, base lr, decays and cosine."""
    lr = finite(meta.get("lr"))
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


def pretraining(meta: dict) -> str:
    """What every manner starts from, in words: W_0, or the pretrained model and its data."""
    pre = meta.get("pretrain")
    if not isinstance(pre, dict):
        return "none (every manner starts from the key's W_0)"
    source = meta.get("pretrained_from")
    whose = f" (scale {source}'s pretrained models, the same files)" if isinstance(source, str) else ""
    return (f"{cell_text(pre.get('words'))} {cell_text(pre.get('styles'))}-style words of another seed, "
            f"{cell_text(pre.get('epochs'))} epochs{whose}; every manner starts from that model")  # fmt: skip


def setup(meta: dict, runs: list[dict]) -> str:
    """The report's Setup section: machine, data, rounds, recipe, presets and wall times."""
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    presets = meta.get("presets") if isinstance(meta.get("presets"), dict) else {}
    preset_text = ", ".join(f"{k}: {v}" for k, v in presets.items()) if presets else DASH
    walls = [w for run in runs if (w := finite(run.get("wall_s"))) is not None]
    runs_wall = hms(sum(walls)) if walls else DASH
    lines = [
        f"- Machine: {cell_text(meta.get('machine'))}",
        f"- Scale: {cell_text(meta.get('scale'))}",
        f"- Training words: {cell_text(data.get('train_words'))}; test words per set: "
        f"{cell_text(data.get('test_words_per_set'))} ({len(TEST_SETS)} test sets)",
        f"- Labels: {cell_text(meta.get('labels'))}; styles: {cell_text(data.get('styles'))}",
        f"- Edges: {cell_text(data.get('edges'))}; data seed: {cell_text(data.get('seed'))}",
        f"- Rounds: {cell_text(meta.get('rounds'))}; local epochs per round: "
        f"{cell_text(meta.get('local_epochs'))}; batch size: {cell_text(meta.get('batch_size'))}",
        f"- Learning rate: {lr_schedule(meta)}",
        f"- Pretraining: {pretraining(meta)}",
        f"- Presets: {preset_text}; beam width of the final evaluation: {cell_text(meta.get('beam'))}; "
        f"torch threads per process: {cell_text(meta.get('threads_per_process'))}",
        f"- Wall time: {runs_wall} summed over {len(walls)} runs; whole experiment: "
        f"{hms(finite(meta.get('wall_s')))}",
    ]
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path, docs_md: Path, fig_png: Path, preamble: str = "") -> None:
    """Write the Markdown report of ``results_dir`` to ``docs_md`` and its Fig. 3 to ``fig_png``.

    ``preamble`` (the caller's prose) goes verbatim after the title. Missing meta fields show as
    dashes. Raises ValueError (from :func:`load_runs`) on a broken run file.
    """
    results_dir, docs_md, fig_png = Path(results_dir), Path(docs_md), Path(fig_png)
    named = load_named(results_dir)
    runs = [run for _, run in named]
    meta = load_meta(results_dir)
    scale = meta.get("scale") or next((run["scale"] for run in runs if run.get("scale")), None)

    plot_fig3(runs, fig_png)
    link = Path(os.path.relpath(fig_png.resolve(), docs_md.resolve().parent)).as_posix()

    parts = [f"# Results: the paper's experiments in miniature (scale {cell_text(scale)})\n"]
    if preamble:
        parts.append(preamble if preamble.endswith("\n") else preamble + "\n")
    parts.append("## Setup\n\n" + setup(meta, runs))
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
        + analogue_sentence()
        + " Word accuracy in %; 1-NED is 1 − normalized edit distance (mean over the test sets).\n\n"
        + table2(runs)
    )
    parts.append(f"## Fig. 3 analogue\n\n![Fig. 3 analogue]({link})\n")
    run_lines = [
        f"- `{name}`: {clock(finite(run.get('wall_s')))} on {cell_text(run.get('machine'))}"
        for name, run in named
    ]
    parts.append("## Runs\n\n" + ("\n".join(run_lines) if run_lines else DASH) + "\n")

    docs_md.parent.mkdir(parents=True, exist_ok=True)
    docs_md.write_text("\n".join(parts), encoding="utf-8")
