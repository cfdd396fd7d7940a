"""The experiment's data: a training set of every style family in C IID shards, one test set per family."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from experiments.scales import PRETRAIN_STYLE, TEST_SETS, Scale
from recognizer.shard import split_dataset
from recognizer.synth import STYLES, render_dataset

log = logging.getLogger(__name__)

TEST_SEED_OFFSET = 1000  # test set k uses seed + 1000 + k: never a training sample's generator
PRETRAIN_SEED_OFFSET = 2000  # the pretraining set's seed: neither a training nor a test set's


@dataclass(frozen=True)
class ExperimentData:
    """Paths of the rendered data."""

    train: Path
    shards: tuple[Path, ...]
    tests: dict[str, Path]
    pretrain: Path | None = None  # clean-style words the models are pretrained on (None: no pretraining)


def _finished(path: Path) -> bool:
    return (path / "data.mdb").exists()


def _render(path: Path, count: int, seed: int, styles: tuple[str, ...], labels: str) -> None:
    """Render into ``path.partial`` and rename, so an interrupted render is redone, never reused.

    One process: this one has torch loaded, and forking it for render workers can deadlock.
    """
    if _finished(path):
        return
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    render_dataset(partial, count, seed, styles, labels=labels)
    partial.rename(path)
    log.info("rendered %s (%d words)", path, count)


def data_settings(scale: Scale) -> dict:
    """What decides a scale's rendered data (settings.json in its data directory holds it)."""
    return {"train_words": scale.train_words, "test_words": scale.test_words, "labels": scale.labels,
            "edges": scale.edges, "seed": scale.seed,
            **({"pretrain_words": scale.pretrain_words} if scale.pretrain_words else {})}  # fmt: skip


def make_data(root: Path, scale: Scale) -> ExperimentData:
    """Render (or find) the training set, its IID shards and the six test sets under ``root``.

    Every style family appears in training (sample i is drawn in STYLES[i % 8]); the test sets are
    rendered from other seeds and never used in training. Finished parts are kept on a rerun.

    Raises:
        ValueError: ``root`` holds data rendered for other settings (settings.json says which).
    """
    root.mkdir(parents=True, exist_ok=True)
    stamp, wanted = root / "settings.json", data_settings(scale)
    if stamp.exists() and json.loads(stamp.read_text()) != wanted:
        raise ValueError(
            f"{root} holds data rendered with other settings than scale {scale.name}'s {wanted}: "
            "delete it, or pass another --work"
        )
    stamp.write_text(json.dumps(wanted) + "\n")
    train = root / "train"
    _render(train, scale.train_words, scale.seed, STYLES, scale.labels)
    shards_dir = root / "shards"
    shards = tuple(shards_dir / f"shard{k}" for k in range(scale.edges))
    if not all(_finished(s) for s in shards):
        partial = root / "shards.partial"
        shutil.rmtree(partial, ignore_errors=True)
        split_dataset(train, scale.edges, partial, "iid", scale.seed)
        shutil.rmtree(shards_dir, ignore_errors=True)
        partial.rename(shards_dir)
    tests = {}
    for k, style in enumerate(TEST_SETS):
        tests[style] = root / "test" / style
        seed = scale.seed + TEST_SEED_OFFSET + k
        _render(tests[style], scale.test_words, seed, (style,), scale.labels)
    pretrain = None
    if scale.pretrain_words:
        pretrain = root / "pretrain"
        seed = scale.seed + PRETRAIN_SEED_OFFSET
        _render(pretrain, scale.pretrain_words, seed, (PRETRAIN_STYLE,), scale.labels)
    return ExperimentData(train, shards, tests, pretrain)
