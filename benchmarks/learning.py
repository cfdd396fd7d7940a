"""How fast a training recipe learns to read: steps and CPU seconds to 50% and 90% word accuracy.

Run: .venv/bin/python -m benchmarks.learning [--rows default,adadelta,...] [--budget 900] [--parallel 2]
     [--labels digits --results results/learning-digits]   (every row on digit strings)

Data (rendered once into --data-dir): TRAIN_WORDS clean synthetic training images and a held-out set
of HELD_OUT clean images of another seed, for each label kind a row uses (``recognizer synth
--labels``: ``words``, dictionary words of up to 10 letters in mixed case; ``mixed``, the default mix
of words, numbers, codes and punctuation). Accuracy is the paper's: case-insensitive word accuracy on
alphanumerics, greedy decoding.

Each row is one recipe: the default CPU recipe (the ``fedocr-cpu`` preset hashed at
gamma 1/2 with the training settings of ``recognizer train``) with one choice changed, an ablation. A row
trains in a process of its own, on one torch thread unless the row says otherwise, until it reaches
90% or spends its budget of training CPU seconds (the process's CPU time inside training steps and
data loading; the held-out scoring every EVAL_EVERY steps is not counted). Rows run --parallel at a
time; CPU seconds, not wall time, are what the table compares. One JSON per finished row lands in
--results (a rerun skips finished rows, so a long run can be resumed); the table is printed from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recognizer.recipe import DEFAULT_BATCH_SIZE

TRAIN_WORDS = 20_000
HELD_OUT = 500
TRAIN_SEED, HELD_OUT_SEED = 11, 12
EVAL_EVERY = 250
KEY = bytes(range(32))  # a fixed federation key: every row starts from the same W_0 of its architecture


@dataclass(frozen=True)
class Row:
    """One recipe: the default with these changes (model config fields and training settings)."""

    name: str
    what: str
    model: dict[str, Any] = field(default_factory=dict)  # recognizer.model.ModelConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainSettings overrides
    labels: str = "words"
    budget_factor: float = 1.0  # x --budget (the mixed labels' target allows 30 CPU-minutes)


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop does (the defaults are `recognizer train`'s)."""

    preset: str = "fedocr-cpu"
    gamma: float | None = 0.5
    optimizer: str = "adam"
    lr: float | None = None  # None: recognizer.recipe.DEFAULT_LR of the optimizer
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()  # the lr is x0.1 from each of these steps on
    cosine: tuple[int, ...] = ()  # (start, end): held until step start, then a cosine to 1% at end
    batch_size: int = DEFAULT_BATCH_SIZE
    bf16: bool = False
    threads: int = 1
    rectify_from_step: int = 0  # with a rectifier: bypass it until this step


ROWS: tuple[Row, ...] = (
    Row("default", "the default CPU recipe"),
    Row("adadelta", "Adadelta lr 1.0 (the paper's optimizer)", train={"optimizer": "adadelta"}),
    Row("adamw-warmup", "AdamW, 300 warm-up steps", train={"optimizer": "adamw", "warmup_steps": 300}),
    Row("adam-1e-3", "Adam lr 1e-3", train={"lr": 1e-3}),
    Row("content-attention", "ASTER's content-only attention (no location filters)",
        model={"dec_location": 0}),
    Row("stretched", "images stretched to 32x100 (ASTER), not aspect-kept", model={"keep_aspect": False}),
    Row("colour-input", "RGB input as read, no grey polarity normalization", model={"polarity_norm": False}),
    Row("rectifier", "TPS rectifier from the start (64x256 input)",
        model={"tps": True, "input_hw": (64, 256)}),
    Row("rectifier-later", "TPS rectifier switched on at step 2,000 (64x256 input)",
        model={"tps": True, "input_hw": (64, 256)}, train={"rectify_from_step": 2000}),
    Row("narrow-stages", "fedocr-tiny's ShuffleNet stages (32/64/128), the default before",
        train={"preset": "fedocr-tiny"}),
    Row("decay-2000", "lr x0.1 from step 2,000", train={"decay_steps": (2000,)}),
    Row("decay-1500", "lr x0.1 from step 1,500", train={"decay_steps": (1500,)}),
    Row("cosine-1500", "lr held to step 1,500, then a cosine to 1% at 3,500", train={"cosine": (1500, 3500)}),
    Row("lr-3e-3-cosine-1000", "Adam lr 3e-3 held to step 1,000, then a cosine to 1% at 3,500",
        train={"lr": 3e-3, "cosine": (1000, 3500)}),
    Row("batch-32", "batch 32", train={"batch_size": 32}),
    Row("batch-64", "batch 64", train={"batch_size": 64}),
    Row("no-aux-ctc", "no auxiliary CTC loss", model={"ctc_weight": 0.0}),
    Row("no-skip", "no linear skip around the BiLSTM", model={"lstm_skip": False}),
    Row("bf16", "CPU bf16 autocast", train={"bf16": True}),
    Row("2-threads", "two torch threads", train={"threads": 2}),
    Row("unhashed", "not hashed (gamma none)", train={"gamma": None}),
    Row("mixed-labels", "default recipe on the default mixed labels (30 CPU-min budget)",
        labels="mixed", budget_factor=2.0),
    Row("mixed-lr-3e-3-cosine-2500", "mixed labels, Adam 3e-3 held to step 2,500, cosine to 1% at 6,500",
        labels="mixed", budget_factor=2.0, train={"lr": 3e-3, "cosine": (2500, 6500)}),
    # The transformer recognizer (8x8 patches as tokens; recognizer/vit.py): the default recipe, and the
    # usual transformer one (AdamW at a lower lr after a linear warm-up).
    Row("vitstr-tiny", "vitstr-tiny (a transformer encoder), the default recipe",
        train={"preset": "vitstr-tiny"}),
    Row("vitstr-tiny-adamw", "vitstr-tiny, AdamW lr 1e-3, 500 warm-up steps",
        train={"preset": "vitstr-tiny", "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 500}),
    Row("vitstr-tiny-seq", "vitstr-tiny-seq (its columns of tokens read by the CPU presets' head)",
        train={"preset": "vitstr-tiny-seq"}),
)  # fmt: skip


def make_data(data_dir: Path, labels: str) -> tuple[Path, Path]:
    """Render (once) the training and held-out LMDBs of a label kind; returns their paths."""
    from recognizer.synth import render_dataset

    train, held_out = data_dir / f"{labels}-train", data_dir / f"{labels}-held-out"
    for path, count, seed in ((train, TRAIN_WORDS, TRAIN_SEED), (held_out, HELD_OUT, HELD_OUT_SEED)):
        if not (path / "data.mdb").exists():
            render_dataset(path, count, seed, ["clean"], labels=labels, overwrite=True)
    return train, held_out


def train_until(
    row: Row, train_path: Path, held_out: Path, budget_s: float, save: Path | None = None
) -> dict:
    """Train ``row``'s recipe until 90% held-out word accuracy or ``budget_s`` CPU seconds; with ``save``,
    write the model it ends with there (the key, KEY, beside it as .key)."""
    import torch

    from fedocr.schedule import cosine_lr
    from recognizer import train as tr
    from recognizer.dataset import make_loader
    from recognizer.model import build_model, resolve_preset
    from recognizer.recipe import DEFAULT_LR

    s = dataclasses.replace(TrainSettings(), **row.train)
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    config = dataclasses.replace(resolve_preset(s.preset), **row.model)
    model = build_model(config, KEY, s.gamma)
    data = model.image_options
    loader = make_loader(train_path, s.batch_size, shuffle=True, drop_last=True, **data)
    val = make_loader(held_out, 100, shuffle=False, **data)
    base_lr = s.lr if s.lr is not None else DEFAULT_LR[s.optimizer]
    optimizer = tr.make_optimizer(model, base_lr, s.optimizer)
    if model.rectifier is not None:
        model.rectify = s.rectify_from_step == 0
    step, cpu, curve = 0, 0.0, []
    reached: dict[str, dict] = {}
    started = time.process_time()
    while True:
        for images, targets, _ in loader:
            lr = cosine_lr(step, base_lr, *s.cosine) if s.cosine else tr.lr_at(step, base_lr, s.decay_steps)
            lr *= tr.warmup_factor(step, s.warmup_steps)
            tr.set_lr(optimizer, lr)
            if model.rectifier is not None and step == s.rectify_from_step:
                model.rectify = True
            model.train()
            loss = tr.train_step(model, images, targets, optimizer, bf16=s.bf16)
            step += 1
            if step % EVAL_EVERY:
                continue
            cpu += time.process_time() - started
            result = tr.evaluate(model, val, beam_width=1, bf16=s.bf16)
            point = {"step": step, "cpu_s": round(cpu, 1), "accuracy": round(result.accuracy, 4),
                     "char_accuracy": round(result.char_accuracy, 4), "loss": round(loss, 4)}
            curve.append(point)
            print(json.dumps({"row": row.name, **point}), flush=True)
            for level in ("50", "90"):
                if level not in reached and result.accuracy >= int(level) / 100:
                    reached[level] = point
            if "90" in reached or cpu >= budget_s:
                if save is not None:
                    _save(model, config, save)
                return {"row": row.name, "what": row.what, **identity(row, budget_s),
                        "reached": reached, "curve": curve, "steps_per_cpu_s": round(step / cpu, 2)}
            started = time.process_time()


def _save(model, config, path: Path) -> None:
    from recognizer import state
    from recognizer.keys import write_key
    from recognizer.model import build_model, resolve_preset
    from recognizer.model_io import save_model

    if config != resolve_preset(config.name):
        raise ValueError(f"{path}: a row that changes the model is no preset; its model cannot be saved")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.with_suffix(".key").exists():
        write_key(path.with_suffix(".key"), KEY)
    fingerprint = state.fingerprint(build_model(config.name, KEY, model.gamma), KEY)
    save_model(path, model, KEY, config.name, fingerprint)


def identity(row: Row, budget_s: float) -> dict:
    """What a stored result must have been made with to stand for ``row`` (settings, model, data, budget)."""
    s = dataclasses.replace(TrainSettings(), **row.train)
    return {"labels": row.labels, "settings": json.loads(json.dumps(dataclasses.asdict(s))),
            "model": json.loads(json.dumps(row.model)), "budget_s": budget_s}


def is_finished(row: Row, path: Path, budget_s: float) -> bool:
    """Whether ``path`` holds this row's result; one made with other settings is reported and redone."""
    if not path.exists():
        return False
    stored = json.loads(path.read_text())
    want = identity(row, budget_s)
    if {k: stored.get(k) for k in want} == want:
        return True
    print(f"{path}: made with other settings than row {row.name!r} has now; running it again", flush=True)
    return False


def may_start(row: Row, running: list[Row], parallel: int) -> bool:
    """Whether ``row`` may start beside the ``running`` rows: a row of several threads runs alone,
    with nothing started beside it, so that no neighbour inflates its CPU seconds."""
    def threads(r: Row) -> int:
        return r.train.get("threads", TrainSettings.threads)

    if any(threads(r) > 1 for r in running):
        return False
    return not running if threads(row) > 1 else len(running) < parallel


def _fmt(point: dict | None, key: str) -> str:
    return "-" if point is None else f"{point[key]:,.0f}"


def table(results: list[dict]) -> str:
    """The ablation table: one line per row, steps and CPU seconds to 50% and 90%."""
    lines = [
        f"{'row':<18} {'what':<58} {'steps/s':>7} {'50%: steps':>10} {'CPU s':>6} "
        f"{'90%: steps':>10} {'CPU s':>6} {'final':>7}",
    ]
    for r in results:
        last = r["curve"][-1]
        r50, r90 = r["reached"].get("50"), r["reached"].get("90")
        lines.append(
            f"{r['row']:<18} {r['what'][:58]:<58} {r['steps_per_cpu_s']:>7.2f} {_fmt(r50, 'step'):>10} "
            f"{_fmt(r50, 'cpu_s'):>6} {_fmt(r90, 'step'):>10} {_fmt(r90, 'cpu_s'):>6} "
            f"{100 * last['accuracy']:>6.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the missing rows (several at a time), then print the table of all requested rows."""
    p = argparse.ArgumentParser(prog="benchmarks.learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="comma-separated row names (default: all)")
    p.add_argument("--budget", type=float, default=900.0, help="training CPU seconds per row")
    p.add_argument("--parallel", type=int, default=2, help="rows trained at once (one thread each)")
    p.add_argument("--data-dir", type=Path, default=Path("runs/learning"))
    p.add_argument("--results", type=Path, default=Path("results/learning"))
    p.add_argument("--labels", choices=("words", "mixed", "digits"),
                   help="train and score every row on this label kind instead of the row's own")
    p.add_argument("--models", type=Path, help="write each row's final model here as ROW.npz (and ROW.key)")
    p.add_argument("--run-row", help=argparse.SUPPRESS)  # internal: train one row in this process
    args = p.parse_args(argv)
    rows = ROWS if args.labels is None else tuple(dataclasses.replace(r, labels=args.labels) for r in ROWS)
    by_name = {r.name: r for r in rows}
    names = args.rows.split(",") if args.rows else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(by_name)}")
    if args.run_row:
        row = by_name[args.run_row]
        train_path, held_out = make_data(args.data_dir, row.labels)
        save = args.models / f"{row.name}.npz" if args.models else None
        result = train_until(row, train_path, held_out, args.budget * row.budget_factor, save)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{row.name}.json").write_text(json.dumps(result, indent=1))
        return 0
    for labels in sorted({by_name[n].labels for n in names}):
        make_data(args.data_dir, labels)  # before the rows start, so none renders it twice
    todo = [n for n in names if not is_finished(by_name[n], args.results / f"{n}.json",
                                                 args.budget * by_name[n].budget_factor)]
    running: list[tuple[Row, subprocess.Popen]] = []
    while todo or running:
        running = [(row, proc) for row, proc in running if proc.poll() is None]
        if todo and may_start(by_name[todo[0]], [row for row, _ in running], args.parallel):
            name = todo.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.learning", "--run-row", name, "--budget",
                   str(args.budget), "--data-dir", str(args.data_dir), "--results", str(args.results)]
            cmd += ["--labels", args.labels] if args.labels else []
            cmd += ["--models", str(args.models)] if args.models else []
            running.append((by_name[name], subprocess.Popen(cmd)))
            continue
        time.sleep(2)
    results = [json.loads((args.results / f"{n}.json").read_text()) for n in names
               if (args.results / f"{n}.json").exists()]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
