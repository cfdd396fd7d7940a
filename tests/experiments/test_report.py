"""experiments/report/: run files in, Markdown tables and the Fig. 3 PNG out.

The numbers below are invented; the tests check that the report computes and prints the right
derived values (reductions, Acc_FED − Acc_SUM, the yes/no checks) from whatever the runs hold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repo root: pytest runs in importlib mode

from experiments.report import document, load, tables  # noqa: E402
from experiments.report.cells import MODEL_LABELS  # noqa: E402
from experiments.scales import TEST_SETS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# model -> (real params, manner -> (mean word accuracy, mean 1-NED))
MODELS = {
    "aster-fl": (
        2_000_000,
        {"single": (0.30, 0.700), "centralized": (0.43, 0.810), "federated": (0.40, 0.808)},
    ),
    "fedocr-hash-1/2": (
        700_000,
        {"single": (0.45, 0.600), "centralized": (0.415, 0.790), "federated": (0.412, 0.770)},
    ),
    "fedocr-hash-1/8": (
        260_000,
        {"single": (0.01, 0.350), "centralized": (0.02, 0.420), "federated": (0.02, 0.419)},
    ),
}


def make_run(model: str, manner: str, real: int, acc: float, ned: float) -> dict:
    """A run in the schema the experiment runner writes; per-set values spread around the means."""
    offsets = (-0.02, -0.01, 0.0, 0.0, 0.01, 0.02)  # sum 0: the per-set mean equals ``acc``
    federated = manner == "federated"
    gamma = None if model == "aster-fl" else model.rsplit("-", 1)[1]
    return {
        "scale": "tiny",
        "model": model,
        "label": MODEL_LABELS[model],
        "backbone": "ResNet" if model == "aster-fl" else "ShuffleNetV2",
        "preset": "test",
        "gamma": gamma,
        "manner": manner,
        "params": {"real": real, "virtual": 2_000_000},
        "model_file_bytes": real * 4 + 1000,
        "epochs": 4,
        "rounds": 2 if federated else None,
        "local_epochs": 2,
        "accuracy": {
            name: {"accuracy": max(acc + off, 0.0), "char_accuracy": ned, "loss": 1.0, "samples": 50}
            for name, off in zip(TEST_SETS, offsets, strict=True)
        },
        "mean_accuracy": acc,
        "mean_char_accuracy": ned,
        "upload": (
            {
                "raw_bytes_per_edge_per_round": real * 4,
                "wire_bytes_per_edge_per_round": real * 3,
                "raw_bytes_total": real * 4 * 2 * 3,
                "wire_bytes_total": real * 3 * 2 * 3,
                "edges": 3,
            }
            if federated
            else None
        ),
        "curve": (
            [
                {
                    "round": r,
                    "upload_mb_per_edge": r * real * 4 / 1e6,
                    "clean_accuracy": acc * r / 2,
                    "clean_char_accuracy": ned * r / 2,
                }
                for r in range(3)
            ]
            if federated
            else []
        ),
        "wall_s": 125.4,
        "machine": "2 CPU cores (x86_64), no GPU",
        "finished": "2026-01-01T00:00:00+00:00",
    }


META = {
    "scale": "tiny",
    "machine": "2 CPU cores (x86_64), no GPU",
    "data": {
        "train_words": 600,
        "test_words_per_set": 50,
        "styles": ["clean", "blur"],
        "edges": 3,
        "seed": 7,
    },
    "rounds": 2,
    "local_epochs": 2,
    "batch_size": 16,
    "lr": 1.0,
    "lr_decay_rounds": [1],
    "lr_decay_factors": [0.1],
    "presets": {"aster-fl": "aster-fl-tiny", "fedocr": "fedocr-tiny"},
    "wall_s": 999.0,
}


def write_results(folder: Path, models: dict = MODELS, meta: dict | None = META) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for model, (real, manners) in models.items():
        for manner, (acc, ned) in manners.items():
            name = f"{model.replace('/', '_')}__{manner}.json"
            (folder / name).write_text(json.dumps(make_run(model, manner, real, acc, ned)))
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def table_rows(markdown: str, header_cell: str) -> dict[str, list[str]]:
    """The rows (first cell -> all cells) of the first Markdown table whose header has ``header_cell``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header_cell in line)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.setdefault(cells[0], cells)
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("report")
    results = write_results(root / "results" / "tiny")
    docs_md, fig = root / "docs" / "results.md", root / "docs" / "img" / "fig3.png"
    document.write_report(results, docs_md, fig, preamble="Prose from the caller, kept *verbatim*.\n")
    return docs_md, fig, docs_md.read_text(encoding="utf-8")


def test_png_is_written(written: tuple[Path, Path, str]) -> None:
    _, fig, markdown = written
    data = fig.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)
    assert "![Fig. 3 analogue](img/fig3.png)" in markdown


def test_sections_labels_and_preamble(written: tuple[Path, Path, str]) -> None:
    _, _, markdown = written
    assert markdown.startswith("# Results: the paper's experiments in miniature (scale tiny)\n")
    assert "Prose from the caller, kept *verbatim*." in markdown
    positions = [
        markdown.index(h)
        for h in ("## Setup", "## Table 1 analogue", "## Table 2 analogue", "## Fig. 3 analogue", "## Runs")
    ]
    assert positions == sorted(positions)
    for model in MODELS:
        assert MODEL_LABELS[model] in markdown
    assert "FedOCR-Hash_1/4" not in markdown  # absent models get no row
    assert "curved ≈ CUTE" in markdown
    # Setup from meta.json; wall time summed over the 9 runs (9 × 125.4 s = 0:18:49) and meta's own
    assert "×0.1 from round 1 on" in markdown
    assert "0:18:49" in markdown and "0:16:39" in markdown
    assert "`fedocr-hash-1_2__federated.json`: 2:05 on 2 CPU cores" in markdown


def test_table1_reduction_upload_and_accuracy(written: tuple[Path, Path, str]) -> None:
    _, _, markdown = written
    rows = table_rows(markdown, "reduction vs ASTER-FL")
    base = MODELS["aster-fl"][0]
    for model, (real, manners) in MODELS.items():
        cells = rows[MODEL_LABELS[model]]
        assert cells[3] == f"{real / 1e6:.3f}"
        expected_reduction = f"{100 * (1 - real / base):.2f} %"
        assert cells[4] == expected_reduction
        assert cells[6] == f"{real * 4 / 1e6:.3f} / {real * 3 / 1e6:.3f}"
        assert cells[7] == f"{manners['federated'][0] * 100:.1f}"
    assert rows["FedOCR-Hash_1/2"][4] == "65.00 %"  # the formula, checked once by hand
    assert rows["FedOCR-Hash_1/2"][8] == "6.70 / 68.08 % / 86.65"
    assert rows["ASTER-FL"][2] == "–"  # no γ for the unhashed baseline


def test_table2_accuracy_rows(written: tuple[Path, Path, str]) -> None:
    _, _, markdown = written
    header_line = next(line for line in markdown.splitlines() if "| Manner |" in line)
    assert [c.strip() for c in header_line.strip("|").split("|")][2:8] == list(TEST_SETS)
    lines = [line for line in markdown.splitlines() if line.startswith("| FedOCR-Hash_1/2 | single |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[2] == "43.0" and cells[7] == "47.0"  # clean 0.45 - 0.02, noisy 0.45 + 0.02
    assert cells[8] == "45.0" and cells[9] == "0.600"


def test_table2_federated_checks(written: tuple[Path, Path, str]) -> None:
    _, _, markdown = written
    rows = table_rows(markdown, "Acc_FED − Acc_SUM")
    for model, (_, m) in MODELS.items():
        cells = rows[MODEL_LABELS[model]]
        diff = (m["federated"][0] - m["centralized"][0]) * 100
        assert cells[1] == f"{round(diff, 1) + 0.0:+.1f}"
        reads = min(m["federated"][0], m["centralized"][0]) >= tables.READING_FLOOR
        assert cells[2] == ("not reading" if not reads else "yes" if abs(diff) <= 0.5 else "no")
        fed_reads = m["federated"][0] >= tables.READING_FLOOR
        beaten = "yes" if m["single"][0] < m["federated"][0] else "no"
        assert cells[3] == ("not reading" if not fed_reads else beaten)
        ned_diff = m["federated"][1] - m["centralized"][1]
        assert cells[4] == f"{round(ned_diff, 3) + 0.0:+.3f}"
        assert cells[5] == ("yes" if abs(ned_diff) <= 0.005 + 1e-12 else "no")
        assert cells[6] == ("yes" if m["single"][1] < m["federated"][1] else "no")
    # the same facts written out, so the expectations above cannot drift together with the code
    assert rows["ASTER-FL"][1:4] == ["-3.0", "no", "yes"]
    assert rows["FedOCR-Hash_1/2"][1:7] == ["-0.3", "yes", "no", "-0.020", "no", "yes"]
    # 2% word accuracy reads nothing: its word checks are not counted; 1-NED still compares
    assert rows["FedOCR-Hash_1/8"][1:7] == ["+0.0", "not reading", "not reading", "-0.001", "yes", "yes"]
    assert "not reading: the federated" in markdown


def test_missing_baseline_and_manner_give_dashes(tmp_path: Path) -> None:
    models = {"fedocr-hash-1/2": (700_000, {"federated": (0.41, 0.77), "single": (0.3, 0.6)})}
    runs = load.load_runs(write_results(tmp_path / "r", models, meta=None))
    row = table_rows(tables.table1(runs), "reduction vs ASTER-FL")["FedOCR-Hash_1/2"]
    assert row[4] == "–"
    checks = table_rows(tables.table2(runs), "Acc_FED − Acc_SUM")["FedOCR-Hash_1/2"]
    assert checks[1:4] == ["–", "–", "yes"]
    # no meta.json at all, and a model without a federated run: still a report and a figure
    runs_only_single = {"aster-fl": (2_000_000, {"single": (0.3, 0.6)})}
    results = write_results(tmp_path / "s", runs_only_single, meta=None)
    document.write_report(results, tmp_path / "out.md", tmp_path / "fig.png")
    text = (tmp_path / "out.md").read_text(encoding="utf-8")
    assert "(scale tiny)" in text and "- Machine: –" in text
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG_MAGIC)


def test_load_runs_order_and_meta_skipped(tmp_path: Path) -> None:
    runs = load.load_runs(write_results(tmp_path, MODELS))
    assert len(runs) == 9
    names = sorted(p.name for p in tmp_path.glob("*.json") if p.name != "meta.json")
    assert [f"{r['model'].replace('/', '_')}__{r['manner']}.json" for r in runs] == names


def test_load_runs_names_a_broken_file(tmp_path: Path) -> None:
    write_results(tmp_path, MODELS)
    (tmp_path / "zz_broken.json").write_text('{"model": "aster-fl", ')
    with pytest.raises(ValueError, match="zz_broken.json"):
        load.load_runs(tmp_path)
    (tmp_path / "zz_broken.json").write_text(json.dumps({"model": "aster-fl", "manner": "single"}))
    with pytest.raises(ValueError, match=r"zz_broken\.json.*accuracy"):
        load.load_runs(tmp_path)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"optimizer": "adam", "lr": 0.002}, "adam lr 0.002 (constant)"),
        ({"optimizer": "adadelta", "lr": 1.0, "lr_decay_rounds": [5, 30], "lr_decay_factors": [0.1, 0.01],
          "lr_decay_epochs": [12, 87]},
         "adadelta lr 1, ×0.1 from round 5 on, ×0.01 from round 30 on "
         "(single and centralized: from epoch 13, 88)"),
        ({"optimizer": "adam", "lr": 0.002, "lr_cosine_from_round": 5, "lr_cosine_from_epoch": 12},
         "adam lr 0.002, falling along a cosine from round 5 to 1% at the end of the last "
         "(single and centralized: the same cosine over epochs, from epoch 13)"),
    ],
)  # fmt: skip
def test_the_setup_names_the_lr_plan(meta: dict, expected: str) -> None:
    assert document.lr_schedule(meta) == expected


def test_the_setup_names_the_pretraining() -> None:
    assert document.pretraining({}) == "none (every manner starts from the key's W_0)"
    pre = {"pretrain": {"words": 8000, "epochs": 3, "styles": "clean"}}
    assert document.pretraining(pre) == (
        "8000 clean-style words of another seed, 3 epochs; every manner starts from that model"
    )


def test_committed_reports_live_in_docs_results_beside_their_figures():
    root = Path(__file__).resolve().parents[2]
    scales = sorted(p.stem for p in (root / "experiments" / "discussion").glob("*.md"))
    assert "mini-pre" in scales
    for scale in scales:
        report_md = (root / "docs" / "results" / f"experiment-{scale}.md").read_text(encoding="utf-8")
        assert report_md.startswith(f"# Results: the paper's experiments in miniature (scale {scale})\n")
        assert f"![Fig. 3 analogue](fig3-{scale}.png)" in report_md
        assert (root / "docs" / "results" / f"fig3-{scale}.png").read_bytes().startswith(PNG_MAGIC)
    assert not list((root / "docs").glob("results*.md")) and not list((root / "docs").glob("fig3-*.png"))
