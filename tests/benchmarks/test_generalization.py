"""benchmarks/generalization.py end to end on a one-epoch tiny model and sets of a few images."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import generalization
from recognizer import cli
from recognizer.lmdb_data import DATA_FILE


def test_generalization_table_renders_caches_and_scores_every_row(tmp_path: Path, capsys) -> None:
    assert cli.main(["synth", "--out", str(tmp_path / "words"), "--count", "16", "--progress", "none"]) == 0
    model = tmp_path / "tiny.npz"
    assert cli.main(["train", "--data", str(tmp_path / "words"), "--preset", "fedocr-tiny", "--epochs", "1",
                     "--out", str(model), "--threads", "1", "--progress", "none"]) == 0
    argv = ["--model", str(model), "--count", "4", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "results"), "--name", "tiny", "--beam", "1", "--workers", "1",
            "--threads", "1"]
    capsys.readouterr()

    assert generalization.main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "results" / "tiny.json").read_text())
    sets = sorted((tmp_path / "work" / "sets").iterdir())
    stamps = [(s / DATA_FILE).stat().st_mtime_ns for s in sets]
    assert generalization.main(argv) == 0  # the second run reuses the rendered sets

    names = [row.name for row in generalization.ROWS]
    assert names == ["in-distribution", "fonts-unseen", "backgrounds-unseen", "long-words", "agg", "classic"]
    assert len(sets) == len(names) and [(s / DATA_FILE).stat().st_mtime_ns for s in sets] == stamps
    (scored,) = report["models"]
    assert scored["model"] == str(model) and scored["preset"] == "fedocr-tiny"
    assert set(scored["rows"]) == set(names) and report["count"] == 4
    for name in names:
        row = scored["rows"][name]
        assert row["samples"] == 4 and 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["char_accuracy"] <= 1.0
        assert name in table
