"""The generalization table: word accuracy on held-out sets that each differ from training in one way.

Run from the repository root:
    .venv/bin/python -m benchmarks.generalization --model runs/general.npz [--model M2.npz ...] \\
        [--count 1000] [--labels words] [--work-dir runs/generalization] [--name NAME]

Rows are defined against the rich renderer's training split (``recognizer synth --styles varied
--fonts train --backgrounds train``): ``in-distribution`` is that with another seed; ``fonts-unseen``
draws the held-out font families, ``backgrounds-unseen`` the held-out background kinds,
``long-words`` words of 11 to 25 letters, ``agg`` matplotlib's rasterizer (recognizer/render_agg.py)
and ``classic`` the renderer's original eight styles. The first four share one seed, so their
labels coincide where the label kind does. Each row prints word accuracy (case-insensitive
alphanumerics, as ``recognizer eval``), 1-N.E.D., and the ratio to the in-distribution row; sets are
rendered once into the work directory and reused. The JSON goes to results/generalization/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recognizer.dataset import make_loader
from recognizer.keys import load_key
from recognizer.lmdb_data import DATA_FILE, LmdbReader
from recognizer.model_io import load_model
from recognizer.render_agg import render_agg_dataset
from recognizer.synth import STYLES, Sources, render_dataset
from recognizer.train import evaluate

logger = logging.getLogger(__name__)

RESULTS = Path("results/generalization")
SEED = 1001  # the held-out sets' seed: never a training seed of the recipes (recipe.synth_seed is 1)


@dataclass(frozen=True)
class Row:
    """A held-out set: how it is rendered, and the one way it differs from the training data."""

    name: str
    differs: str
    styles: str = "varied"  # comma-separated synth styles; "agg" renders with matplotlib instead
    fonts: str = "train"
    backgrounds: str = "train"
    labels: str | None = None  # None: the benchmark's --labels


ROWS: tuple[Row, ...] = (
    Row("in-distribution", "nothing: the training renderer, fonts and backgrounds, another seed"),
    Row("fonts-unseen", "font families held out of training", fonts="held-out"),
    Row("backgrounds-unseen", "background kinds held out of training", backgrounds="held-out"),
    Row("long-words", "words of 11 to 25 letters", labels="long"),
    Row("agg", "another rasterizer: matplotlib's Agg and its own fonts", styles="agg"),
    Row("classic", "the renderer's original eight styles, nine families, flat backgrounds",
        styles=",".join(STYLES), fonts="classic", backgrounds="classic"),
)


def render_row(row: Row, work: Path, count: int, labels: str, workers: int) -> Path:
    """The row's LMDB under ``work`` (rendered unless a complete one of that size is there)."""
    kind = row.labels or labels
    path = work / f"{row.name}-{kind}-{count}-s{SEED}"
    if (path / DATA_FILE).is_file():
        try:
            if len(LmdbReader(path)) == count:
                return path
        except ValueError:
            pass  # half-written: render again
    start = time.perf_counter()
    if row.styles == "agg":
        render_agg_dataset(path, count, SEED, labels=kind, overwrite=True)
    else:
        render_dataset(path, count, SEED, row.styles.split(","), labels=kind, workers=workers,
                       sources=Sources(row.fonts, (), row.backgrounds, ()), overwrite=True)
    logger.info("rendered %s (%d images) in %.1f s", path, count, time.perf_counter() - start)
    return path


def score(model_path: Path, key_path: Path, sets: dict[str, Path], beam: int, batch_size: int) -> dict:
    """Accuracy and 1-N.E.D. of one model file on every set, as ``recognizer eval`` computes them."""
    model, meta = load_model(model_path, load_key(key_path))
    rows = {}
    for name, path in sets.items():
        loader = make_loader(path, batch_size, shuffle=False, **model.image_options)
        result = evaluate(model, loader, beam_width=beam)
        rows[name] = {"accuracy": result.accuracy, "char_accuracy": result.char_accuracy,
                      "samples": result.samples}
    reference = rows["in-distribution"]["accuracy"]
    for row in rows.values():
        row["ratio"] = row["accuracy"] / reference if reference else None
    return {"model": str(model_path), "preset": meta["preset"], "gamma": meta["gamma"], "rows": rows}


def print_table(report: dict) -> None:
    """One block per model: a line per row with accuracy, 1-N.E.D. and the ratio to in-distribution."""
    for scored in report["models"]:
        print(f"\n{scored['model']} ({scored['preset']}, gamma {scored['gamma']}), "
              f"{report['count']} images a row, beam {report['beam']}")
        reference = scored["rows"]["in-distribution"]["accuracy"]
        print(f"  {'row':<20} {'accuracy':>9} {'1-NED':>7} {'in-dist':>8} {'ratio':>6}  differs in")
        for row in ROWS:
            r = scored["rows"][row.name]
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(f"  {row.name:<20} {100 * r['accuracy']:>8.1f}% {r['char_accuracy']:>7.3f} "
                  f"{100 * reference:>7.1f}% {ratio:>6}  {row.differs}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Render (or reuse) the held-out rows, score every model on them, print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], type=Path, help="a model file; repeat for more")
    p.add_argument("--key", action="append", default=[], type=Path,
                   help="the federation key of the --model in the same position (default: MODEL with .key)")
    p.add_argument("--count", type=int, default=1000, help="images a row (default 1000)")
    p.add_argument("--labels", default="words", help="label kind of the rows but long-words (default words)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/generalization"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="generalization", help="the JSON file's name under --out-dir")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    models = list(args.model)
    if not models:
        p.error("give at least one --model")
    if len(args.key) > len(args.model):
        p.error("more --key than --model")
    keys = [*args.key, *(m.with_suffix(".key") for m in models[len(args.key):])]
    sets = {row.name: render_row(row, args.work_dir / "sets", args.count, args.labels, args.workers)
            for row in ROWS}
    report = {
        "rows": [asdict(row) for row in ROWS], "count": args.count, "labels": args.labels, "seed": SEED,
        "beam": args.beam, "commit": _commit(), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "models": [score(m, k, sets, args.beam, args.batch_size) for m, k in zip(models, keys, strict=True)],
    }
    print_table(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
