"""The analogues of the paper's Table 1 (size and upload per round) and Table 2 (accuracy per test set
and manner, then federated against centralized and single), as Markdown."""

from __future__ import annotations

from experiments.report.cells import (
    DASH,
    MB,
    MODEL_ORDER,
    by_pair,
    cell_text,
    finite,
    fmt,
    markdown_table,
    mean_metric,
    model_label,
    models_present,
    representative,
    set_metric,
    signed,
    yes_no,
)
from experiments.scales import MANNERS, TEST_SETS

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
BASELINE = "aster-fl"
# Acc_FED counts as matching Acc_SUM when within this many points (1-NED: the same on a 0-100 scale).
WITHIN_PT = 0.5
# Below this mean word accuracy a model is at or near its initial plateau: it does not read yet,
# so comparing its accuracy with another manner's tests nothing about federated learning.
READING_FLOOR = 0.30
NOT_READING = "not reading"


def table1(runs: list[dict]) -> str:
    """The analogue of the paper's Table 1: size, upload per round and accuracy per model.

    Param reduction is ``100 * (1 - real / real of ASTER-FL)`` (a dash without an ASTER-FL run);
    upload and accuracy come from the model's federated run (dashes without one).
    """
    index = by_pair(runs)
    base = None
    if any(m == BASELINE for m, _ in index):
        base = finite(representative(index, BASELINE).get("params", {}).get("real"))
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
    for model in models_present(runs):
        rep = representative(index, model)
        params = rep.get("params") if isinstance(rep.get("params"), dict) else {}
        real = finite(params.get("real"))
        if base and real is not None:
            reduction = f"{100.0 * (1.0 - real / base) + 0.0:.2f} %"
        else:
            reduction = DASH
        fed = index.get((model, "federated"))
        upload = fed.get("upload") if fed is not None and isinstance(fed.get("upload"), dict) else None
        if upload is not None:
            raw = fmt(upload.get("raw_bytes_per_edge_per_round"), ".3f", 1 / MB)
            wire = fmt(upload.get("wire_bytes_per_edge_per_round"), ".3f", 1 / MB)
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
                model_label(model, runs),
                cell_text(rep.get("backbone")),
                cell_text(rep.get("gamma")),
                fmt(real, ".3f", 1 / MB),
                reduction,
                fmt(rep.get("model_file_bytes"), ".2f", 1 / MB),
                upload_text,
                fmt(mean_metric(fed, "accuracy"), ".1f", 100.0),
                paper_text,
            ]
        )
    return markdown_table(header, rows, ["l", "l", "l", "r", "r", "r", "r", "r", "r"])


def paper_size_table(meta: dict) -> str:
    """The paper-size presets counted (not trained): parameters, upload per round and the reduction
    against ASTER-FL, next to the paper's reductions. Reads ``meta["paper_size"]``."""
    sizes = meta.get("paper_size")
    if not isinstance(sizes, dict) or not sizes:
        return DASH + "\n"
    base = finite(sizes.get(BASELINE, {}).get("real_params"))
    header = ["Model", "Preset", "γ", "Params (real, M)", "Upload per round (MB, raw)",
              "reduction vs ASTER-FL", "Paper: params (M) / reduction"]  # fmt: skip
    rows = []
    for model in [m for m in MODEL_ORDER if m in sizes]:
        size = sizes[model]
        real = finite(size.get("real_params"))
        reduction = f"{100.0 * (1.0 - real / base):.2f} %" if base and real is not None else DASH
        paper = PAPER_TABLE1.get(model)
        paper_text = DASH
        if paper is not None:
            paper_text = f"{paper[0]:.2f} / " + (DASH if paper[1] is None else f"{paper[1]:.2f} %")
        rows.append([model_label(model), cell_text(size.get("preset")), cell_text(size.get("gamma")),
                     fmt(real, ".3f", 1 / MB), fmt(size.get("state_bytes"), ".2f", 1 / MB), reduction,
                     paper_text])  # fmt: skip
    return markdown_table(header, rows, ["l", "l", "l", "r", "r", "r", "r"])


def comparisons(runs: list[dict]) -> str:
    """Per model: Acc_FED − Acc_SUM and single < federated, on word accuracy and on 1-NED."""
    index = by_pair(runs)
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
    for model in models_present(runs):
        cells = [model_label(model, runs)]
        for metric, scale, decimals in (("accuracy", 100.0, 1), ("char_accuracy", 1.0, 3)):
            fed = mean_metric(index.get((model, "federated")), metric)
            central = mean_metric(index.get((model, "centralized")), metric)
            single = mean_metric(index.get((model, "single")), metric)
            diff = None if fed is None or central is None else (fed - central) * scale
            within = None if diff is None else abs(diff) <= WITHIN_PT * scale / 100.0 + 1e-12
            beaten = None if fed is None or single is None else single < fed
            within_cell, beaten_cell = yes_no(within), yes_no(beaten)
            if metric == "accuracy":  # word accuracy compares only models that read
                if within is not None and min(fed, central) < READING_FLOOR:
                    within_cell = NOT_READING
                if beaten is not None and fed < READING_FLOOR:
                    beaten_cell = NOT_READING
            cells += [signed(diff, decimals), within_cell, beaten_cell]
        rows.append(cells)
    note = (
        f"\n{NOT_READING}: the federated (or, for FED − SUM, the centralized) model's mean word accuracy "
        f"is below {READING_FLOOR:.0%}, at or near its initial plateau, so that word-accuracy check "
        "tests nothing yet.\n"
    )
    return markdown_table(header, rows, ["l", "r", "l", "l", "r", "l", "l"]) + note


def table2(runs: list[dict]) -> str:
    """The analogue of the paper's Table 2, then the federated-vs-centralized/single checks.

    The first table has one row per (model, manner) present: word accuracy (%) per test set, the
    mean, and mean 1-NED. The second has, per model, Acc_FED − Acc_SUM in points (federated mean
    minus centralized mean) with whether it is within 0.5 pt, whether single < federated, and the
    same on mean 1-NED, which still moves when word accuracy is near zero at small scale. A word
    accuracy check whose federated (or centralized) model is below READING_FLOOR says "not reading".
    """
    index = by_pair(runs)
    header = ["Model", "Manner", *TEST_SETS, "Mean", "1-NED mean"]
    rows = []
    for model in models_present(runs):
        manners = [m for m in MANNERS if (model, m) in index]
        manners += sorted(m for (mod, m) in index if mod == model and m not in MANNERS)
        for manner in manners:
            run = index[(model, manner)]
            rows.append(
                [
                    model_label(model, runs),
                    manner,
                    *(fmt(set_metric(run, s, "accuracy"), ".1f", 100.0) for s in TEST_SETS),
                    fmt(mean_metric(run, "accuracy"), ".1f", 100.0),
                    fmt(mean_metric(run, "char_accuracy"), ".3f"),
                ]
            )
    main = markdown_table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2))
    return main + "\n" + comparisons(runs)


def analogue_sentence() -> str:
    """The sentence naming the paper's benchmark each synthetic test set stands in for."""
    pairs = ", ".join(f"{name} ≈ {PAPER_ANALOGUE[name]}" for name in TEST_SETS)
    return f"The synthetic test sets stand in for the paper's benchmarks: {pairs}."
