"""benchmarks.learning reuses a stored row only when it was made with the row's present settings."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is a directory of scripts, not an installed package: load the module from its file.
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "learning.py"
_SPEC = importlib.util.spec_from_file_location("benchmarks_learning", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
learning = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = learning  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(learning)


def _store(path: Path, row: learning.Row, budget_s: float, **changes: object) -> None:
    result = {"row": row.name, "what": row.what, **learning.identity(row, budget_s), "reached": {},
              "curve": [{"step": 250, "cpu_s": 1.0, "accuracy": 0.0}], "steps_per_cpu_s": 1.0}
    result.update(changes)
    path.write_text(json.dumps(result))


@pytest.mark.parametrize("name", ["default", "decay-2000", "rectifier"])
def test_a_row_stored_with_its_settings_is_finished(tmp_path: Path, name: str) -> None:
    row = next(r for r in learning.ROWS if r.name == name)
    _store(tmp_path / "r.json", row, 900.0)
    assert learning.is_finished(row, tmp_path / "r.json", 900.0)


def test_a_missing_row_is_not_finished(tmp_path: Path) -> None:
    assert not learning.is_finished(learning.ROWS[0], tmp_path / "none.json", 900.0)


def test_a_row_stored_with_other_settings_is_run_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = learning.ROWS[0]
    old = dataclasses.asdict(learning.TrainSettings(preset="fedocr-tiny"))
    _store(tmp_path / "old-preset.json", row, 900.0, settings=old)
    assert not learning.is_finished(row, tmp_path / "old-preset.json", 900.0)
    assert "made with other settings" in capsys.readouterr().out
    _store(tmp_path / "short.json", row, 300.0)  # another budget
    assert not learning.is_finished(row, tmp_path / "short.json", 900.0)
    _store(tmp_path / "digits.json", row, 900.0, labels="digits")
    assert not learning.is_finished(row, tmp_path / "digits.json", 900.0)


def test_a_row_of_several_threads_runs_alone() -> None:
    rows = {r.name: r for r in learning.ROWS}
    one, other, two = rows["default"], rows["bf16"], rows["2-threads"]
    assert learning.may_start(one, [], 2) and learning.may_start(one, [other], 2)
    assert not learning.may_start(one, [other, rows["unhashed"]], 2)  # the machine is full
    assert learning.may_start(two, [], 2) and not learning.may_start(two, [one], 2)  # waits for quiet
    assert not learning.may_start(one, [two], 2)  # and nothing starts beside it
