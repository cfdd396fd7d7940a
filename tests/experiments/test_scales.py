"""The scales' lr plans reach both sides alike: the same cosine in a centralized or single run's
epochs as in the federation's rounds, and committed results still match the scale they were made at."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.__main__ import check_results_match, settings
from experiments.data import ExperimentData
from experiments.runs import Context, federation_settings, pretrain_command, pretrained_path, train_command
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
