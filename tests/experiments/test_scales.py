"""The scales' lr plans reach both sides alike: the same cosine in a centralized or single run's
epochs as in the federation's rounds, and committed results still match the scale they were made at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.__main__ import check_results_match, settings
from experiments.data import ExperimentData, data_settings
from experiments.runs import (
    Context,
    adopt_pretrained,
    federation_settings,
    pretrain_command,
    pretrained_path,
    train_command,
)
from experiments.scales import MODELS, SCALES, Scale

REPO = Path(__file__).resolve().parents[2]


def _context(scale: Scale, tmp: Path) -> Context:
    shards = tuple(tmp / f"shard{k}" for k in range(scale.edges))
    pretrain = tmp / "pretrain" if scale.pretrain_words else None
    data = ExperimentData(tmp / "train", shards, {"clean": tmp / "clean"}, pretrain)
    return Context(scale, data, tmp / "key", tmp / "pki", tmp / "work", tmp / "results")


@pytest.mark.parametrize("name", sorted(SCALES))
def test_every_plan_fits_its_rounds(name: str) -> None:
    s = SCALES[name]
    assert 0 <= s.cosine_from_round <= s.rounds
    assert all(1 <= r <= s.rounds for r in s.decay_rounds)
    if s.cosine_from_round:
        assert s.cosine_from_epoch == (s.cosine_from_round - 1) * s.local_epochs
        assert 0 <= s.cosine_from_epoch < s.epochs
    else:
        assert s.cosine_from_epoch is None


def test_a_cosine_scale_gives_the_same_plan_to_every_manner(tmp_path: Path) -> None:
    scale = SCALES["mini-cpu"]
    assert scale.cosine_from_round
    ctx = _context(scale, tmp_path)
    for model in MODELS:
        for manner in ("single", "centralized"):
            cmd = train_command(ctx, model, manner, tmp_path / "model.npz")
            assert cmd[cmd.index("--cosine-from") + 1] == str(scale.cosine_from_epoch)
            assert cmd[cmd.index("--epochs") + 1] == str(scale.epochs)
        fed = federation_settings(ctx, model)
        assert fed.lr_cosine_from_round == scale.cosine_from_round
        assert (fed.rounds, fed.local_epochs, fed.lr) == (scale.rounds, scale.local_epochs, scale.lr)
    recorded = settings(scale)
    assert recorded["lr_cosine_from_round"] == scale.cosine_from_round
    assert recorded["lr_cosine_from_epoch"] == scale.cosine_from_epoch


def test_a_constant_lr_scale_passes_no_cosine(tmp_path: Path) -> None:
    ctx = _context(SCALES["mini"], tmp_path)
    assert "--cosine-from" not in train_command(ctx, MODELS[0], "centralized", tmp_path / "model.npz")
    assert federation_settings(ctx, MODELS[0]).lr_cosine_from_round == 0
    assert "lr_cosine_from_round" not in settings(SCALES["mini"])


def test_committed_results_match_their_scale() -> None:
    committed = [d for d in (REPO / "results").iterdir() if (d / "meta.json").exists() and d.name in SCALES]
    assert {"mini", "mini-pre", "mini-pre-long"} <= {d.name for d in committed}
    for results in committed:
        check_results_match(results, SCALES[results.name])
    with pytest.raises(ValueError, match="lr_cosine_from_round"):
        check_results_match(REPO / "results" / "mini", SCALES["mini-cpu"])


def test_a_pretraining_scale_starts_every_manner_from_the_same_pretrained_model(tmp_path: Path) -> None:
    scale = SCALES["mini-pre"]
    assert scale.pretrain_words and scale.pretrain_epochs
    ctx = _context(scale, tmp_path)
    for model in MODELS:
        pretrained = str(pretrained_path(ctx, model))
        pre = pretrain_command(ctx, model)
        assert pre[pre.index("--out") + 1] == pretrained
        assert pre[pre.index("--data") + 1] == str(tmp_path / "pretrain")
        assert pre[pre.index("--epochs") + 1] == str(scale.pretrain_epochs) and "--init" not in pre
        for manner in ("single", "centralized"):
            cmd = train_command(ctx, model, manner, tmp_path / "model.npz")
            assert cmd[cmd.index("--init") + 1] == pretrained
            assert cmd[cmd.index("--key") + 1] == pre[pre.index("--key") + 1]
        assert federation_settings(ctx, model).extra_edge_args == ("--init", pretrained)
    assert settings(scale)["pretrain"] == {"words": scale.pretrain_words, "epochs": scale.pretrain_epochs,
                                           "styles": "clean"}  # fmt: skip
    plain = _context(SCALES["mini-cpu"], tmp_path)
    assert "--init" not in train_command(plain, MODELS[0], "single", tmp_path / "m.npz")
    assert federation_settings(plain, MODELS[0]).extra_edge_args == ()


def test_a_scale_that_starts_from_another_has_its_data_and_pretraining() -> None:
    followers = [s for s in SCALES.values() if s.pretrained_from]
    assert {s.name for s in followers} == {"mini-pre-long", "mini-pre-el1", "mini-pre-b48"}
    for scale in followers:
        source = SCALES[scale.pretrained_from]
        assert source.pretraining is not None and not source.pretrained_from
        assert data_settings(scale) == data_settings(source) and scale.pretraining == source.pretraining
        assert settings(scale)["pretrained_from"] == source.name
    assert "pretrained_from" not in settings(SCALES["mini-pre"])


def _source(tmp: Path) -> tuple[Path, Path]:
    """A scale's work and results directories with a key, two pretrained models and their scores."""
    work, results = tmp / "source-work", tmp / "source-results"
    (work / "pretrained").mkdir(parents=True)
    (results / "pretrained").mkdir(parents=True)
    (work / "federation.key").write_bytes(b"k" * 32)
    for model in MODELS[:2]:
        (work / "pretrained" / f"{model.slug}.npz").write_bytes(model.id.encode())
        (results / "pretrained" / f"{model.slug}.json").write_text(f'{{"model": "{model.id}"}}')
    (work / "data").mkdir()
    (work / "data" / "settings.json").write_text("{}")
    return work, results


def test_adopting_copies_the_key_models_scores_and_data(tmp_path: Path) -> None:
    source, source_results = _source(tmp_path)
    work, results = tmp_path / "work", tmp_path / "results"
    adopt_pretrained(source, source_results, work, results, list(MODELS[:2]))
    assert (work / "federation.key").read_bytes() == b"k" * 32
    assert (work / "data" / "settings.json").exists()
    for model in MODELS[:2]:
        assert (work / "pretrained" / f"{model.slug}.npz").read_bytes() == model.id.encode()
        assert model.id in (results / "pretrained" / f"{model.slug}.json").read_text()
    adopt_pretrained(source, source_results, work, results, list(MODELS[:2]))  # a rerun finds them in place
    adopt_pretrained(source, None, tmp_path / "w2", tmp_path / "r2", list(MODELS[:1]))
    assert not (tmp_path / "r2" / "pretrained").exists()  # no scores given: the run scores the model itself


FAULTS = ["other key", "other model", "source lacks a model", "source lacks the key"]


@pytest.mark.parametrize("fault", FAULTS)
def test_adopting_refuses_what_would_mix_two_starts_and_copies_nothing(tmp_path: Path, fault: str) -> None:
    source, source_results = _source(tmp_path)
    work, results = tmp_path / "work", tmp_path / "results"
    models = list(MODELS[:2])
    (work / "pretrained").mkdir(parents=True)
    if fault == "other key":
        (work / "federation.key").write_bytes(b"x" * 32)
    elif fault == "other model":
        (work / "pretrained" / f"{MODELS[1].slug}.npz").write_bytes(b"another model")
    elif fault == "source lacks a model":
        models = list(MODELS[:3])
    else:
        (source / "federation.key").unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="move .* away" if fault.startswith("other") else "does not exist"):
        adopt_pretrained(source, source_results, work, results, models)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_scale_whose_source_has_not_run_exits_with_an_error_naming_it(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "--scale", "mini-pre-el1", "--work", str(tmp_path / "w"),
         "--results", str(tmp_path / "r"), "--pretrained-work", str(nowhere)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"error: {nowhere / 'federation.key'} does not exist" in proc.stderr
    assert not (tmp_path / "w" / "data").exists() and not (tmp_path / "r").exists()


def test_pretrained_work_for_a_scale_that_starts_from_none_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "--scale", "mini-pre", "--work", str(tmp_path / "w"),
         "--results", str(tmp_path / "r"), "--pretrained-work", str(tmp_path / "elsewhere")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: --pretrained-work: scale mini-pre starts from no other scale's models" in proc.stderr
    assert not (tmp_path / "w").exists()
