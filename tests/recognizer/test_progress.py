"""Progress of long loops: log lines off a terminal, a bar on one, nothing on stdout, same results."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from recognizer import cli
from recognizer.progress import Progress, clock, count_lines, resolve_mode, watch
from recognizer.synth import render_dataset

# step/total, mean loss, images/s, elapsed and ETA, as `recognizer train` logs them off a terminal
TRAIN_LINE = re.compile(
    r"recognizer\.progress: epoch (\d)/2: step (\d+)/4, loss \d+\.\d{4}, \d+\.\d images/s, "
    r"elapsed \d+:\d\d, ETA \d+:\d\d$"
)
EPOCH_LINE = " epoch {'epoch': "  # what experiments/runs.py counts in a training's log


def records(path: Path) -> list[tuple[bytes, bytes]]:
    """Every key and value of an LMDB, in key order (the file's free space may hold anything)."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image synthetic LMDB."""
    out = tmp_path_factory.mktemp("progress") / "words"
    render_dataset(out, 24, seed=3)
    return out


@pytest.fixture(scope="module")
def trained(words: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """`recognizer train` as a process logging to a file, as the experiments run it: (model, stdout, log)."""
    home = tmp_path_factory.mktemp("train")
    model, log_file = home / "tiny.npz", home / "train.log"
    argv = [sys.executable, "-m", "recognizer.cli", "train", "--data", str(words), "--preset", "fedocr-tiny",
            "--epochs", "2", "--batch-size", "6", "--threads", "1", "--progress-every", "2",
            "--out", str(model)]
    with log_file.open("w") as err:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=300)
    assert done.returncode == 0, log_file.read_text()
    return model, done.stdout, log_file.read_text()


def test_train_off_a_terminal_logs_step_loss_rate_and_eta_every_n_steps(trained, words: Path) -> None:
    _model, out, log_text = trained

    steps = [m.groups() for line in log_text.splitlines() if (m := TRAIN_LINE.search(line))]

    assert steps == [("1", "2"), ("1", "4"), ("2", "2"), ("2", "4")]
    assert count_lines(Path(words).parent / "absent.log", EPOCH_LINE) == 0
    assert log_text.count(EPOCH_LINE) == 2  # the per-epoch summary stays, one per epoch
    assert [row["epoch"] for row in json.loads(out)["history"]] == [1, 2]  # stdout is the JSON alone


def test_eval_json_stdout_parses_beside_progress_lines(trained, words: Path, capsys, caplog) -> None:
    model, _out, _log = trained
    caplog.set_level(logging.INFO, logger="recognizer.progress")

    code = cli.main(["eval", "--model", str(model), "--data", str(words), "--json", "--beam", "1",
                     "--batch-size", "8", "--progress", "log", "--progress-every", "1"])
    out, _err = capsys.readouterr()

    assert code == 0
    assert json.loads(out)["samples"] == 24
    lines = [r.getMessage() for r in caplog.records if r.name == "recognizer.progress"]
    assert [line.split(",")[0] for line in lines] == [f"evaluating: batch {i}/3" for i in (1, 2, 3)]


def test_synth_reports_to_stderr_and_writes_the_same_lmdb(tmp_path: Path) -> None:
    render_dataset(tmp_path / "plain", 24, seed=3)  # no progress callback at all
    argv = [sys.executable, "-m", "recognizer.cli", "synth", "--count", "24", "--seed", "3"]

    logged = subprocess.run([*argv, "--out", str(tmp_path / "logged"), "--progress", "log",
                             "--progress-every", "10"], capture_output=True, text=True, timeout=120)
    quiet = subprocess.run([*argv, "--out", str(tmp_path / "quiet"), "--progress", "none"],
                           capture_output=True, text=True, timeout=120)

    assert logged.returncode == 0 and quiet.returncode == 0
    assert re.findall(r"rendering: image (\d+)/24, \d+\.\d images/s, elapsed", logged.stderr) == ["10", "20"]
    assert "rendering:" not in quiet.stderr
    assert json.loads(logged.stdout)["count"] == 24  # stdout is the JSON alone
    assert records(tmp_path / "logged") == records(tmp_path / "quiet") == records(tmp_path / "plain")
    assert len(records(tmp_path / "plain")) == 1 + 3 * 24  # num-samples, and an image, label and style each


def test_log_lines_every_n_steps_with_the_mean_loss_and_the_eta(caplog) -> None:
    caplog.set_level(logging.INFO, logger="recognizer.progress")

    with Progress(5, "epoch 1/1", rate_unit="images", mode="log", every=2, every_s=1e9) as progress:
        for loss in (4.0, 2.0, 3.0, 1.0, 5.0):
            progress.update(items=10, loss=loss)

    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(", ")[:2] for line in lines] == [["epoch 1/1: step 2/5", "loss 3.0000"],
                                                        ["epoch 1/1: step 4/5", "loss 2.5000"]]
    assert all("images/s" in line and "ETA" in line for line in lines)
    assert progress.items == 50 and progress.loss == 3.0


def test_none_says_nothing_and_bar_draws_on_stderr(caplog, capsys) -> None:
    caplog.set_level(logging.INFO, logger="recognizer.progress")

    with Progress(3, "quiet", mode="none", every=1) as quiet:
        quiet.update(3)
    with Progress(3, "drawn", unit="image", rate_unit="images", mode="bar") as drawn:
        drawn.update_to(3)
    out, err = capsys.readouterr()

    assert quiet.done == 3 and drawn.done == 3 and not caplog.records
    assert out == "" and "drawn" in err and "3/3" in err
    assert resolve_mode("auto") == "log"  # pytest's stderr is no terminal
    with pytest.raises(ValueError, match="progress mode"):
        resolve_mode("loud")


def test_watch_reports_what_another_process_wrote(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="recognizer.progress")
    journal = tmp_path / "rounds.jsonl"
    journal.write_text('{"status": "counted"}\n')

    with watch(lambda: count_lines(journal, '"status": "counted"'), 3, "run", unit="round", mode="log",
               poll_s=3600) as progress:
        journal.write_text('{"status": "counted"}\n{"status": "late"}\n{"status": "counted"}\n')

    assert progress.initial == 1 and progress.done == 2
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["run: round 2/3"]


def test_clock_reads_like_tqdm() -> None:
    assert [clock(5), clock(65.4), clock(3725)] == ["0:05", "1:05", "1:02:05"]
