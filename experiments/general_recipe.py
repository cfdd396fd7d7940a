"""`python -m experiments.general_recipe` (`make general-recipe`): the general-purpose recipe end to end,
timed, in one command (docs/recognizer.md, "Reading text it was not rendered for").

Stages, as `recognizer` processes, each skipped when its output exists (so an interrupted run goes on
where it stopped; the timings of stages run before are kept in timings.json):

1. the classic words of the first stage (20,000, seed 1), rendered;
2. the first stage (fedocr-cpu, 4 epochs, lr 0.003, cosine from epoch 1, one thread), and beside it,
   on the other core, the recipe's varied words (GENERAL.synth_count, seed 11), its long words
   (GENERAL.long_count, seed 13) and 20,000 classic words of seed 12, rendered one set after another;
3. the recipe: `recognizer train --recipe general --init` the first stage's model (two threads).

With --scale N every count is divided by N (a quick check of the pipeline, not a result). Writes
WORK/timings.json: each stage's wall seconds and the whole run's, and the machine's idle CPU share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recognizer.lmdb_data import DatasetError, LmdbReader
from recognizer.recipe import GENERAL

PY = sys.executable
SEEDS = 9  # replicates: their render seeds (1 + 100 s ...) stay below the held-out sets' 1001


def _recognizer(*args: str) -> list[str]:
    return [PY, "-m", "recognizer.cli", *args]


def _done(path: Path) -> bool:
    """A finished model file, or an LMDB with its sample count (an interrupted render has none)."""
    if path.suffix == ".npz":
        return path.exists()
    try:
        LmdbReader(path)
    except DatasetError:
        return False
    return True


def _run_together(jobs: dict[str, tuple[list[str], Path]], logs: Path) -> None:
    """Run the jobs whose output is missing side by side; raise naming the log of one that fails."""
    running = {}
    for name, (cmd, out) in jobs.items():
        if not _done(out):
            log = logs / f"{name}.log"
            running[name] = (subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT), log)
    for name, (proc, log) in running.items():
        if proc.wait() != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")


def reseed(cmd: list[str], seed: int) -> None:
    """Make ``cmd`` (a recognizer synth or train command line) another replicate, in place: a
    render's seed moves by 100 x ``seed`` (below the held-out sets' 1001 for seed < SEEDS), and a
    training run gets ``--seed seed`` (its batch order and augmentation draws)."""
    if "synth" in cmd:
        at = cmd.index("--seed") + 1
        cmd[at] = str(int(cmd[at]) + 100 * seed)
    else:
        cmd += ["--seed", str(seed)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.general_recipe",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("runs/general-recipe"))
    p.add_argument("--scale", type=int, default=1, help="divide every count by this (a quick check)")
    p.add_argument("--seed", type=int, default=0, choices=range(SEEDS),
                   help="another replicate: every render seed + 100 x this, training seeded with it "
                   "(default 0: the recipe's own seeds)")
    args = p.parse_args(argv)
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    n = max(1, args.scale)
    words, varied, long, classic = work / "words", work / "varied", work / "long", work / "classic"
    stage1, model = work / "classic.npz", work / "general.npz"
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    stage1_epochs = "4" if n == 1 else "1"
    stages = {
        "render first-stage words": {"words": (_recognizer(
            "synth", "--out", str(words), "--count", str(20_000 // n), "--seed", "1", "--labels", "words",
            "--progress", "log"), words)},
        "first stage, and the recipe's data beside it": {
            "first stage": (_recognizer(
                "train", "--data", str(words), "--preset", "fedocr-cpu", "--gamma", "1/2", "--epochs",
                stage1_epochs, "--lr", "0.003", "--cosine-from", "1" if n == 1 else "0",
                "--threads", "1", "--out", str(stage1), "--progress", "log"), stage1),
            "varied words": (_recognizer(*GENERAL.synth_argv(str(varied)), "--progress", "log"), varied),
            **({"long words": (_recognizer(*GENERAL.long_argv(str(long)), "--progress", "log"), long)}
               if GENERAL.long_count else {}),
            "classic words": (_recognizer(
                "synth", "--out", str(classic), "--count", str(20_000 // n), "--seed", "12", "--labels",
                "words", "--progress", "log"), classic),
        },
        "the recipe": {"general": (_recognizer(
            "train", "--recipe", "general", "--init", str(stage1), "--key", str(stage1.with_suffix(".key")),
            "--data", str(varied), *(["--data", str(long)] if GENERAL.long_count else []),
            "--data", str(classic), "--gamma", "1/2", "--out", str(model),
            "--progress", "log", *(["--epochs", "1"] if n > 1 else [])), model)},
    }  # fmt: skip
    if n > 1:  # the varied sets at 1/n of their size
        jobs = stages["first stage, and the recipe's data beside it"]
        for name, count in (("varied words", GENERAL.synth_count), ("long words", GENERAL.long_count)):
            if name in jobs:
                cmd, _ = jobs[name]
                cmd[cmd.index("--count") + 1] = str(count // n)
    if args.seed:
        for jobs in stages.values():
            for cmd, _ in jobs.values():
                reseed(cmd, args.seed)
    started_all = time.monotonic()
    for stage, jobs in stages.items():
        if all(_done(out) for _, out in jobs.values()):
            continue
        if stage.startswith("first stage"):  # the renders share the second core, one after the other
            t = time.monotonic()
            cmd, out = jobs["first stage"]
            log = work / "logs" / "first stage.log"
            first = None
            if not _done(out):
                first = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
            for name, job in jobs.items():
                if name != "first stage":
                    _run_together({name: job}, work / "logs")
            if first is not None and first.wait() != 0:
                raise RuntimeError(f"the first stage exited with {first.returncode}; see {log}")
            timings[stage] = time.monotonic() - t
        else:
            t = time.monotonic()
            _run_together(jobs, work / "logs")
            timings[stage] = time.monotonic() - t
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"general recipe: {stage} took {timings[stage] / 60:.1f} min", flush=True)
    timings["all stages"] = sum(v for k, v in timings.items() if k != "all stages")
    timings["this invocation"] = time.monotonic() - started_all
    timings["scale"] = n
    timings["cpus"] = os.cpu_count()
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings, indent=2))
    print(f"model: {model} (score it with python -m benchmarks.generalization --model {model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
