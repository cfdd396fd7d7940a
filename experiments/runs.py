"""One run of the experiment: a model trained alone on one shard, centrally on all shards, or federated.

Single and centralized runs are `recognizer train` processes; a federated run is the real thing:
one aggregator and C edge-agent processes over mutual TLS on 127.0.0.1 (``fedocr.harness.LocalFederation``).
Every finished run leaves one JSON file; a run whose file exists is never repeated.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.data import ExperimentData
from experiments.scales import TEST_SETS, ModelSpec, Scale, preset_of
from fedocr import harness
from fedocr.harness import KEY_FILE, LocalFederation, Settings, list_rounds, scores_by_version
from recognizer.dataset import make_loader
from recognizer.keys import load_key
from recognizer.model import model_info
from recognizer.model_io import load_model
from recognizer.progress import count_lines, watch
from recognizer.train import evaluate

log = logging.getLogger(__name__)
PY = sys.executable
STARTED_FILE = "started"  # a training run's start (time.time()), for its wall time
EPOCH_LINE = " epoch {'epoch': "  # what `recognizer train` logs after each epoch
COUNTED_LINE = '"status": "counted"'  # an edge journal's record of a round its upload counted in


class RunError(RuntimeError):
    """A run failed; the message names its log."""


@dataclass(frozen=True)
class Context:
    """What every run of one experiment shares."""

    scale: Scale
    data: ExperimentData
    key: Path  # one federation key: every manner of a model starts from the same W_0
    pki: Path
    work: Path  # run directories (models, logs) go under work/runs
    results: Path  # one JSON per finished run
    encoding: str = "float32"  # how the federated runs' edges encode their uploads (fedocr.encodings)


def machine() -> str:
    """The machine in words, for the result files."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}"


def result_path(ctx: Context, model: ModelSpec, manner: str) -> Path:
    """Where the JSON of a run goes."""
    return ctx.results / f"{model.slug}__{manner}.json"


def run_dir(ctx: Context, model: ModelSpec, manner: str) -> Path:
    """Where a run keeps its model and logs."""
    return ctx.work / "runs" / f"{model.slug}__{manner}"


def _train_args(ctx: Context, model: ModelSpec, epochs: int) -> list[str]:
    s = ctx.scale
    return [
        PY, "-m", "recognizer.cli", "train",
        "--preset", preset_of(s, model), "--gamma", model.gamma or "none", "--epochs", str(epochs),
        "--batch-size", str(s.batch_size), "--optimizer", s.optimizer, "--lr", str(s.lr),
        "--threads", str(s.threads), "--seed", str(s.seed), "--key", str(ctx.key),
    ]  # fmt: skip


def pretrained_file(work: Path, model: ModelSpec) -> Path:
    """Where an experiment's work directory ``work`` keeps ``model``'s pretrained model."""
    return work / "pretrained" / f"{model.slug}.npz"


def pretrained_scores_file(results: Path, model: ModelSpec) -> Path:
    """Where an experiment's ``results`` keep the pretrained model's test scores."""
    return results / "pretrained" / f"{model.slug}.json"


def pretrained_path(ctx: Context, model: ModelSpec) -> Path:
    """The pretrained model every manner of ``model`` starts from (at a scale with pretraining)."""
    return pretrained_file(ctx.work, model)


def adopt_pretrained(source: Path, source_results: Path | None, work: Path, results: Path,
                     models: list[ModelSpec]) -> None:  # fmt: skip
    """Start from another scale's federation key and pretrained models (``Scale.pretrained_from``).

    Copies the key and each model's pretrained file from the work directory ``source`` (their test
    scores from ``source_results`` where it has them, and the rendered data when ``work`` has none)
    into ``work`` and ``results``, where missing. Everything is checked before anything is copied.

    Raises:
        ValueError: ``source`` lacks the key or a model, or ``work`` holds another key or model.
    """
    key, own_key = source / KEY_FILE, work / KEY_FILE
    if not key.exists():
        raise ValueError(f"{key} does not exist: run the scale whose pretrained models these are first")
    pairs = [(key, own_key)]
    for model in models:
        pairs.append((pretrained_file(source, model), pretrained_file(work, model)))
        if source_results and (scores := pretrained_scores_file(source_results, model)).exists():
            pairs.append((scores, pretrained_scores_file(results, model)))
    for src, dst in pairs:
        if not src.exists():
            raise ValueError(f"{src} does not exist: pretrain {', '.join(m.id for m in models)} at the "
                             "scale it belongs to first")  # fmt: skip
        if dst.exists() and dst.read_bytes() != src.read_bytes():
            raise ValueError(f"{dst} is not {src}, which this scale starts from: move {dst.parent} away")
    if not (work / "data").exists() and (source / "data").is_dir():
        shutil.copytree(source / "data", work / "data")
    for src, dst in pairs:
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    log.info("starting from the federation key and pretrained models of %s", source)


def pretrain_command(ctx: Context, model: ModelSpec) -> list[str]:
    """`recognizer train` on the clean pretraining set, at a constant lr."""
    assert ctx.data.pretrain is not None
    cmd = _train_args(ctx, model, ctx.scale.pretrain_epochs)
    return [*cmd, "--data", str(ctx.data.pretrain), "--out", str(pretrained_path(ctx, model))]


def train_command(ctx: Context, model: ModelSpec, manner: str, out: Path) -> list[str]:
    """`recognizer train` for the single (shard 0) or centralized (all shards pooled) manner."""
    s = ctx.scale
    shards = ctx.data.shards[:1] if manner == "single" else ctx.data.shards
    cmd = _train_args(ctx, model, s.epochs)
    for shard in shards:
        cmd += ["--data", str(shard)]
    cmd += ["--decay-epochs", ",".join(map(str, s.decay_epochs)), "--out", str(out)]
    if s.cosine_from_epoch is not None:
        cmd += ["--cosine-from", str(s.cosine_from_epoch)]
    if ctx.data.pretrain is not None:
        cmd += ["--init", str(pretrained_path(ctx, model))]
    return cmd


def pretrain_all(ctx: Context, models: list[ModelSpec], parallel: int = 2) -> None:
    """Pretrain every model that has no pretrained file yet, ``parallel`` at a time (one thread each).

    `recognizer train` writes its model file once, when it ends, so a file that exists is finished.
    """
    todo = [m for m in models if not pretrained_path(ctx, m).exists()]
    running: list[tuple[ModelSpec, subprocess.Popen]] = []
    try:
        while todo or running:
            while todo and len(running) < parallel:
                model = todo.pop(0)
                log_file = pretrained_path(ctx, model).with_suffix(".log")
                log_file.unlink(missing_ok=True)  # an interrupted attempt's log
                log.info("pretraining %s on %s", model.id, ctx.data.pretrain)
                running.append((model, harness.spawn(pretrain_command(ctx, model), log_file)))
            time.sleep(1.0)
            for model, proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove((model, proc))
                if proc.returncode != 0:
                    log_file = pretrained_path(ctx, model).with_suffix(".log")
                    raise RunError(f"{model.id} pretraining: recognizer train exited with {proc.returncode}; "
                                   f"see {log_file}")  # fmt: skip
    finally:
        harness.stop_many([proc for _, proc in running])
    for model in models:
        score_pretrained(ctx, model)


def score_pretrained(ctx: Context, model: ModelSpec) -> dict:
    """The pretrained model's scores on the test sets, before any fine-tuning (kept in
    results/SCALE/pretrained/MODEL.json, beside the runs and not one of them)."""
    path = pretrained_scores_file(ctx.results, model)
    if path.exists():
        return json.loads(path.read_text())
    accuracy = evaluate_model(ctx, pretrained_path(ctx, model))
    record = {
        "model": model.id, "preset": preset_of(ctx.scale, model), "gamma": model.gamma,
        "pretrain": ctx.scale.pretraining,
        "accuracy": accuracy,
        "mean_accuracy": sum(a["accuracy"] for a in accuracy.values()) / len(accuracy),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    log.info("%s pretrained: mean accuracy %.1f%%", model.id, 100 * record["mean_accuracy"])
    return record


def start_training(ctx: Context, model: ModelSpec, manner: str) -> subprocess.Popen:
    """Start a single or centralized run in a fresh run directory."""
    home = run_dir(ctx, model, manner)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / STARTED_FILE).write_text(f"{time.time()}\n")
    return harness.spawn(train_command(ctx, model, manner, home / "model.npz"), home / "train.log")


def _started_at(home: Path) -> float:
    """When the training in ``home`` started: its stamp, else its log's first timestamp."""
    stamp = home / STARTED_FILE
    if stamp.exists():
        return float(stamp.read_text())
    first = (home / "train.log").read_text(errors="replace").split("\n", 1)[0]
    return time.mktime(time.strptime(first[:19], "%Y-%m-%d %H:%M:%S"))


def record_finished_training(ctx: Context, model: ModelSpec, manner: str) -> dict | None:
    """The run's JSON from a training that finished but was never evaluated (its driver was
    stopped first); None when it has no model file. `recognizer train` writes the model file
    once, atomically, when training ends, so its presence means the training finished."""
    home = run_dir(ctx, model, manner)
    model_file = home / "model.npz"
    if not model_file.exists():
        return None
    log.info("%s %s: its training finished earlier; evaluating it", model.id, manner)
    return _record(ctx, model, manner, model_file, model_file.stat().st_mtime - _started_at(home))


def evaluate_model(ctx: Context, model_file: Path) -> dict[str, dict]:
    """Word accuracy, 1-NED and loss of a model file on every test set."""
    torch.set_num_threads(max(1, ctx.scale.threads))
    model, _ = load_model(model_file, load_key(ctx.key))
    scores = {}
    for name in TEST_SETS:
        loader = make_loader(ctx.data.tests[name], 64, shuffle=False, **model.image_options)
        r = evaluate(model, loader, beam_width=ctx.scale.beam)
        scores[name] = {"accuracy": r.accuracy, "char_accuracy": r.char_accuracy, "loss": r.loss,
                        "samples": r.samples}  # fmt: skip
    return scores


def _record(ctx: Context, model: ModelSpec, manner: str, model_file: Path, wall_s: float, **extra) -> dict:
    """The run's JSON (see experiments/report/), written atomically."""
    info = model_info(preset_of(ctx.scale, model), model.gamma_value)
    accuracy = evaluate_model(ctx, model_file)
    record = {
        "scale": ctx.scale.name, "model": model.id, "label": model.label, "backbone": model.backbone,
        "preset": preset_of(ctx.scale, model), "gamma": model.gamma, "manner": manner,
        "params": {"real": info["real_params"], "virtual": info["virtual_params"]},
        "model_file_bytes": model_file.stat().st_size,
        "epochs": ctx.scale.epochs, "rounds": None, "local_epochs": ctx.scale.local_epochs,
        "accuracy": accuracy,
        "mean_accuracy": sum(a["accuracy"] for a in accuracy.values()) / len(accuracy),
        "mean_char_accuracy": sum(a["char_accuracy"] for a in accuracy.values()) / len(accuracy),
        "upload": None, "curve": [],
        "wall_s": round(wall_s, 1), "machine": machine(),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    record.update(extra)
    path = result_path(ctx, model, manner)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    log.info("%s %s: mean accuracy %.1f%%, 1-NED %.3f (%.0f s)", model.id, manner,
             100 * record["mean_accuracy"], record["mean_char_accuracy"], wall_s)  # fmt: skip
    return record


def finish_training(
    ctx: Context, model: ModelSpec, manner: str, proc: subprocess.Popen, started: float
) -> dict:
    """Wait for a training process, then evaluate its model and write the run's JSON.

    ``started`` is the wall-clock start (time.time()); the run's time ends when its model file was
    written, however late the process is reaped.
    """
    home = run_dir(ctx, model, manner)
    with watch(lambda: count_lines(home / "train.log", EPOCH_LINE), ctx.scale.epochs, f"{model.id} {manner}",
               unit="epoch"):
        code = proc.wait()
    if code != 0:
        raise RunError(f"{model.id} {manner}: recognizer train exited with {code}; see {home / 'train.log'}")
    model_file = home / "model.npz"
    return _record(ctx, model, manner, model_file, model_file.stat().st_mtime - started)


def federation_settings(ctx: Context, model: ModelSpec) -> Settings:
    """The aggregator's plan and the edges' model for a federated run of ``model`` at ctx's scale."""
    s = ctx.scale
    return Settings(
        rounds=s.rounds, local_epochs=s.local_epochs, preset=preset_of(s, model), gamma=model.gamma or "none",
        lr=s.lr, batch_size=s.batch_size, quorum=s.edges, min_edges=s.edges, deadline_s=s.deadline_s,
        threads=s.threads, lr_decay_rounds=",".join(map(str, s.decay_rounds)), optimizer=s.optimizer,
        lr_cosine_from_round=s.cosine_from_round, encoding=ctx.encoding,
        extra_edge_args=("--init", str(pretrained_path(ctx, model))) if ctx.data.pretrain is not None else (),
    )  # fmt: skip


def run_federated(ctx: Context, model: ModelSpec) -> dict:
    """C edge agents and one aggregator, real processes over mutual TLS; edge-0 scores each global
    model on the clean test set, which gives Fig. 3's curve."""
    s = ctx.scale
    home = run_dir(ctx, model, "federated")
    shutil.rmtree(home, ignore_errors=True)
    started = time.monotonic()
    with LocalFederation(home, ctx.pki, ctx.key, federation_settings(ctx, model)) as fed:
        fed.start_aggregator(s.edges)
        for k, shard in enumerate(ctx.data.shards):
            fed.start_edge(f"edge-{k}", shard, val=ctx.data.tests["clean"] if k == 0 else None)
        journal = home / "edges" / "edge-0" / "rounds.jsonl"
        with watch(lambda: count_lines(journal, COUNTED_LINE), s.rounds, f"{model.id} federated",
                   unit="round"):
            fed.wait_edges(timeout_s=s.rounds * s.deadline_s + 600)
        rounds = list_rounds(ctx.pki, fed.port)
    wall = time.monotonic() - started
    scores = scores_by_version(home / "edges" / "edge-0" / "rounds.jsonl")
    accounting = _accounting(rounds, scores, s.edges)
    return _record(ctx, model, "federated", home / "edges" / "edge-0" / "final.npz", wall,
                   rounds=s.rounds, encoding=ctx.encoding, **accounting)  # fmt: skip


def _accounting(rounds: dict, scores: dict[int, dict], edges: int) -> dict:
    """Upload bytes per edge per round and the clean-set curve against cumulative raw MB per edge."""
    closed = [r for r in rounds.get("rounds", []) if r["state"].endswith("CLOSED")]
    raw_up = [int(r["bytes"]["raw_up"]) for r in closed]
    wire_up = [int(r["bytes"]["wire_up"]) for r in closed]
    curve, sent = [], 0
    first = scores.get(int(closed[0].get("state_version", 0))) if closed else None  # W_0
    if first:
        curve.append({"round": 0, "upload_mb_per_edge": 0.0, "clean_accuracy": first["accuracy"],
                      "clean_char_accuracy": first["char_accuracy"]})  # fmt: skip
    for r, raw in zip(closed, raw_up, strict=True):
        sent += raw / edges
        after = scores.get(int(r.get("state_version", 0)) + 1)
        if after:
            curve.append({"round": r["round_index"] + 1, "upload_mb_per_edge": sent / 1e6,
                          "clean_accuracy": after["accuracy"], "clean_char_accuracy": after["char_accuracy"]})
    n = max(len(closed), 1)
    upload = {
        "raw_bytes_per_edge_per_round": sum(raw_up) / n / edges,
        "wire_bytes_per_edge_per_round": sum(wire_up) / n / edges,
        "raw_bytes_total": sum(raw_up), "wire_bytes_total": sum(wire_up), "edges": edges,
        "rounds_closed": len(closed),
    }  # fmt: skip
    return {"upload": upload, "curve": curve}
