"""The second rasterizer: matplotlib's Agg writes a readable LMDB of the project's layout, one per seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from recognizer.dataset import WordDataset
from recognizer.lmdb_data import LmdbReader
from recognizer.render_agg import FACES, STYLE, font_properties, render_agg_dataset
from recognizer.synth import SynthError


def test_agg_writes_an_lmdb_that_the_training_reader_loads(tmp_path: Path) -> None:
    stats = render_agg_dataset(tmp_path / "agg", 12, seed=4)
    again = render_agg_dataset(tmp_path / "again", 12, seed=4)
    other = render_agg_dataset(tmp_path / "other", 12, seed=5, labels="digits")

    reader = LmdbReader(tmp_path / "agg")
    samples = [reader.get(i) for i in range(len(reader))]
    assert stats["count"] == len(reader) == 12
    assert all(label.isalpha() and style == STYLE for _, label, style in samples)
    assert all(image.mode == "RGB" and image.width > image.height >= 16 for image, _, _ in samples)
    repeated = LmdbReader(tmp_path / "again")
    assert [reader.get_raw(i) for i in range(12)] == [repeated.get_raw(i) for i in range(12)]
    assert all(LmdbReader(tmp_path / "other").get_label(i).isdigit() for i in range(12))
    image, target, label = WordDataset(tmp_path / "agg", (32, 100), keep_aspect=True)[0]
    assert image.shape == (3, 32, 100) and label == samples[0][1] and int(target[0]) > 0
    assert again["count"] == other["count"] == 12


def test_agg_uses_matplotlibs_own_faces_and_refuses_bad_arguments(tmp_path: Path) -> None:
    files = [str(p.get_file()) for p in font_properties()]
    assert len(files) == len(FACES) == len(set(files))
    assert all("mpl-data" in f for f in files)  # the bundled faces, not whatever the system has
    with pytest.raises(SynthError, match="unknown label kind"):
        render_agg_dataset(tmp_path / "x", 3, seed=1, labels="emoji")
    with pytest.raises(SynthError, match="count must be"):
        render_agg_dataset(tmp_path / "y", 0, seed=1)
