"""Edge-agent fixtures: small synthetic shards, a federation key, and federations of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedocr.harness import LocalFederation, Settings
from recognizer.keys import generate_key
from recognizer.shard import split_dataset
from recognizer.synth import render_dataset

TRAIN_WORDS = 480
TEST_WORDS = 96


@dataclass(frozen=True)
class EdgeData:
    """Two IID shards of clean synthetic words and a held-out test set of another seed."""

    shards: list[Path]
    test: Path


@pytest.fixture(scope="session")
def edge_data(tmp_path_factory: pytest.TempPathFactory) -> EdgeData:
    """Rendered once per session (about a second)."""
    root = tmp_path_factory.mktemp("edge-data")
    render_dataset(root / "train", TRAIN_WORDS, seed=11, styles=["clean"])
    render_dataset(root / "test", TEST_WORDS, seed=12, styles=["clean"])
    shards = split_dataset(root / "train", 2, root / "shards", seed=11)
    return EdgeData(shards=shards, test=root / "test")


@pytest.fixture(scope="session")
def federation_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation key file shared by the edges (never given to the aggregator)."""
    path = tmp_path_factory.mktemp("key") / "federation.key"
    generate_key(path)
    return path


@pytest.fixture
def launch(test_pki, federation_key: Path, tmp_path: Path) -> Iterator:
    """Factory: a LocalFederation (aggregator + edge processes) in tmp_path; stopped after the test."""
    started: list[LocalFederation] = []

    def _launch(settings: Settings) -> LocalFederation:
        fed = LocalFederation(tmp_path, test_pki.dir, federation_key, settings)
        started.append(fed)
        return fed

    yield _launch
    for fed in started:
        fed.stop()
