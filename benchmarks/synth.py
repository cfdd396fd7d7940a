"""Measured figures for the data path: rendering images/s per style, and WordDataset read+decode images/s.

Run from the repository root:
    .venv/bin/python -m benchmarks.synth [--per-style 500] [--read 4000] [--workers 0 2]

Besides the eight classic styles (classic fonts and backgrounds, mixed labels) it times the varied
mode: ``--styles varied --labels general --fonts train --backgrounds train``, and the held-out sides.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from recognizer.dataset import WordDataset, make_loader
from recognizer.synth import (
    STYLES,
    VARIED,
    Sources,
    dictionary_words,
    font_files,
    long_words,
    render_dataset,
    render_sample,
)

# The rich modes timed beside the classic styles: (name, label kind, sources).
VARIED_MODES: tuple[tuple[str, str, Sources], ...] = (
    ("varied/general/train", "general", Sources("train", (), "train", ())),
    ("varied/general/held-out", "general", Sources("held-out", (), "held-out", ())),
    ("varied/long/train", "long", Sources("train", (), "train", ())),
)

logger = logging.getLogger(__name__)


def render_rates(per_style: int, seed: int) -> dict[str, dict[str, float]]:
    """Images/s of ``render_sample`` (render + JPEG encode, one process) per style family.

    Both per wall-clock second and per CPU second of this process: on a shared machine the
    second is the steadier figure.
    """
    font_files(), dictionary_words(), long_words()  # one-off loads are not part of the rate
    modes = [(style, style, "mixed", Sources()) for style in STYLES]
    modes += [(name, VARIED, labels, sources) for name, labels, sources in VARIED_MODES]
    for _, style, labels, sources in modes[len(STYLES):]:
        render_sample(seed, 0, style, labels=labels, sources=sources)  # font scan, once
    rates = {}
    for name, style, labels, sources in modes:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(per_style):
            render_sample(seed, i, style, labels=labels, sources=sources)
        rates[name] = {"wall": per_style / (time.perf_counter() - wall),
                       "cpu": per_style / (time.process_time() - cpu)}
    return rates


def read_rates(path: Path, workers: list[int], batch_size: int = 64) -> dict[str, float]:
    """Images/s of WordDataset items (LMDB read, JPEG decode, resize to 64x256, tensor)."""
    rates = {}
    ds = WordDataset(path)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(len(ds)):
        ds[i]
    rates["dataset_items_wall"] = len(ds) / (time.perf_counter() - wall)
    rates["dataset_items_cpu"] = len(ds) / (time.process_time() - cpu)
    ds.reader.close()  # each loader below opens its own, in its workers
    for n in workers:
        loader = make_loader(path, batch_size, shuffle=True, workers=n)
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _, _ in loader)
        rates[f"loader_workers_{n}"] = count / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-style", type=int, default=500, help="images rendered per style")
    parser.add_argument("--read", type=int, default=4000, help="images in the set read back")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--render-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"}
    rates = render_rates(args.per_style, args.seed)
    result["render_images_per_s_one_process"] = {
        k: {kind: round(v) for kind, v in r.items()} for k, r in rates.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench"
        summary = render_dataset(path, args.read, args.seed, workers=args.render_workers)
        result["render_dataset"] = {
            "count": summary["count"], "workers": args.render_workers,
            "images_per_s": round(summary["images_per_s"]),
            "mean_image_bytes": round(summary["bytes"] / summary["count"]),
        }
        result["read_images_per_s"] = {k: round(v) for k, v in read_rates(path, args.workers).items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
