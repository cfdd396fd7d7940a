"""`python -m experiments --scale smoke` end to end: real data, real `recognizer train` processes and
real federations (aggregator + 2 edge agents over mutual TLS) for all 5 models x 3 manners, then
the report; and a rerun repeats only the runs whose result file is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.scales import MANNERS, MODELS, SCALES, TEST_SETS

REPO = Path(__file__).resolve().parents[2]
SMOKE = SCALES["smoke"]


def _experiment(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "experiments", "--scale", "smoke", "--work", str(tmp / "work"),
        "--results", str(tmp / "results"), "--docs", str(tmp / "results.md"), "--fig", str(tmp / "fig3.png"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("smoke")
    proc = _experiment(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def _runs(tmp: Path) -> dict[tuple[str, str], dict]:
    runs = {}
    for path in (tmp / "results").glob("*__*.json"):
        record = json.loads(path.read_text())
        runs[(record["model"], record["manner"])] = record
    return runs


@pytest.mark.timeout(900)
def test_every_model_in_every_manner_leaves_a_result(smoke: Path) -> None:
    runs = _runs(smoke)
    assert set(runs) == {(m.id, manner) for m in MODELS for manner in MANNERS}
    for (model, manner), record in runs.items():
        assert set(record["accuracy"]) == {"clean", "lowres", "blur", "perspective", "curved", "noisy"}
        assert all(a["samples"] == SMOKE.test_words for a in record["accuracy"].values()), (model, manner)
        assert record["epochs"] == SMOKE.rounds * SMOKE.local_epochs  # same passes in every manner
        assert 0.0 <= record["mean_char_accuracy"] <= 1.0


def test_federated_runs_account_bytes_and_draw_a_curve(smoke: Path) -> None:
    runs = _runs(smoke)
    per_round = {}
    for model in MODELS:
        record = runs[(model.id, "federated")]
        upload = record["upload"]
        assert upload["rounds_closed"] == SMOKE.rounds
        assert upload["edges"] == SMOKE.edges
        # A raw upload is the packed float32 state: 4 bytes per real parameter and batch-norm value.
        assert upload["raw_bytes_per_edge_per_round"] >= 4 * record["params"]["real"]
        per_edge_round = upload["raw_bytes_per_edge_per_round"]
        assert upload["raw_bytes_total"] == per_edge_round * SMOKE.edges * SMOKE.rounds
        curve = record["curve"]
        assert [p["round"] for p in curve] == list(range(SMOKE.rounds + 1))  # W_0, then every round
        sent = [p["upload_mb_per_edge"] for p in curve]
        assert sent[0] == 0 and sent == sorted(sent) and sent[-1] > 0
        per_round[model.id] = upload["raw_bytes_per_edge_per_round"]
    # Hashing shrinks the upload with gamma.
    hashed = [per_round[m.id] for m in MODELS if m.gamma is not None]  # gamma 1, 1/2, 1/4, 1/8
    assert hashed == sorted(hashed, reverse=True) and len(set(hashed)) == 4


def test_report_and_figure_are_written(smoke: Path) -> None:
    text = (smoke / "results.md").read_text()
    for label in ("ASTER-FL", "FedOCR-Hash_1", "FedOCR-Hash_1/2", "FedOCR-Hash_1/4", "FedOCR-Hash_1/8"):
        assert label in text
    assert "Table 1 analogue" in text and "Table 2 analogue" in text
    png = (smoke / "fig3.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    meta = json.loads((smoke / "results" / "meta.json").read_text())
    assert meta["scale"] == "smoke" and meta["rounds"] == SMOKE.rounds


def test_every_manner_starts_from_the_pretrained_model(smoke: Path) -> None:
    """The smoke scale pretrains: each model is pretrained once and scored, and every manner,
    the federation's edges included, is started from that file."""
    meta = json.loads((smoke / "results" / "meta.json").read_text())
    wanted = {"words": SMOKE.pretrain_words, "epochs": SMOKE.pretrain_epochs, "styles": "clean"}
    assert meta["pretrain"] == wanted
    for model in MODELS:
        pretrained = smoke / "work" / "pretrained" / f"{model.slug}.npz"
        assert pretrained.is_file()
        scored = json.loads((smoke / "results" / "pretrained" / f"{model.slug}.json").read_text())
        assert scored["model"] == model.id and set(scored["accuracy"]) == set(TEST_SETS)
        for manner in ("single", "centralized"):
            log = (smoke / "work" / "runs" / f"{model.slug}__{manner}" / "train.log").read_text()
            assert f"starting from {pretrained}" in log
        edges = sorted((smoke / "work" / "runs" / f"{model.slug}__federated" / "edges").iterdir())
        assert len(edges) == SMOKE.edges
        for edge in edges:
            assert f"starting from {pretrained}" in (edge / "edge.log").read_text()


def test_a_rerun_repeats_only_missing_runs(smoke: Path) -> None:
    results = smoke / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*__*.json")}
    # One run lost its result and its model: trained again. Another lost only its result (its
    # driver was stopped between the training's end and its evaluation): evaluated, not retrained.
    retrain, evaluate = results / "fedocr-hash-1_4__single.json", results / "aster-fl__centralized.json"
    retrain.unlink()
    (smoke / "work" / "runs" / "fedocr-hash-1_4__single" / "model.npz").unlink()
    evaluate.unlink()
    proc = _experiment(smoke)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("*__*.json")}
    assert set(after) == set(before)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {retrain.name, evaluate.name}
    assert "training fedocr-hash-1/4: single" in proc.stderr
    assert "aster-fl centralized: its training finished earlier; evaluating it" in proc.stderr
    assert "training aster-fl: centralized" not in proc.stderr
    assert json.loads(evaluate.read_text())["wall_s"] > 0


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    proc = _experiment(tmp_path, "--models", "fedocr-hash-1/3")
    assert proc.returncode == 2
    assert "unknown model 'fedocr-hash-1/3'" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_results_or_data_of_other_settings_are_refused_not_mixed(smoke: Path, tmp_path: Path) -> None:
    # Results whose meta.json records another recipe: refused before anything runs.
    results = tmp_path / "results"
    results.mkdir()
    meta = json.loads((smoke / "results" / "meta.json").read_text())
    (results / "meta.json").write_text(json.dumps({**meta, "lr": 1.0, "rounds": 99}))
    proc = _experiment(tmp_path)
    assert proc.returncode == 2
    assert f"{results} holds runs made with other settings (lr, rounds differ" in proc.stderr
    assert not (tmp_path / "work").exists()

    # Results of float32 uploads, to be continued with int3 uploads: refused as well.
    assert meta["encoding"] == "float32"
    (results / "meta.json").write_text(json.dumps(meta))
    proc = _experiment(tmp_path, "--encoding", "int3")
    assert proc.returncode == 2
    assert f"{results} holds runs made with other settings (encoding differ" in proc.stderr
    assert not (tmp_path / "work").exists()

    # Data rendered for another training-set size: refused, and kept as it was.
    stamp = tmp_path / "work" / "data" / "settings.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"train_words": 7}))
    (results / "meta.json").unlink()
    proc = _experiment(tmp_path)
    assert proc.returncode == 2 and "holds data rendered with other settings" in proc.stderr
    assert json.loads(stamp.read_text()) == {"train_words": 7}
    assert not list(results.glob("*__*.json"))
