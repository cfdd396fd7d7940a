"""Measured cost of training-time augmentation: data time per batch beside one training step's time.

Run from the repository root:
    .venv/bin/python -m benchmarks.augment [--preset fedocr-cpu] [--batches 40] [--magnitude 0.5]

One thread throughout (the data path of `recognizer train --workers 0` shares the training thread):
the time to read, decode, resize and augment a batch of 16 training images, without and with
augmentation, and the time of one optimizer step of the preset on such a batch; the ratio is the
share of a step that the data path costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recognizer.augment import FAMILIES, AugmentConfig, augment
from recognizer.dataset import WordDataset, collate, image_to_array
from recognizer.model import build_model
from recognizer.recipe import DEFAULT_BATCH_SIZE
from recognizer.synth import render_dataset
from recognizer.train import make_optimizer, train_step

KEY = bytes(range(32))


def batch_seconds(ds: WordDataset, batch: int, batches: int) -> float:
    """Median CPU seconds to build one batch of ``batch`` samples from ``ds``."""
    times = []
    for b in range(batches):
        start = time.process_time()
        collate([ds[(b * batch + i) % len(ds)] for i in range(batch)])
        times.append(time.process_time() - start)
    return float(np.median(times))


def family_seconds(ds: WordDataset, magnitude: float, per_family: int = 200) -> dict[str, float]:
    """Mean CPU milliseconds of one op of each family at ``magnitude`` on one resized image."""
    images = [image_to_array(ds.reader.get(i)[0], ds.input_hw, ds.keep_aspect) for i in range(16)]
    out = {}
    for family in FAMILIES:
        config = AugmentConfig(ops=1, magnitude=magnitude, prob=1.0, families=(family,))
        rng = np.random.default_rng(0)
        start = time.process_time()
        for i in range(per_family):
            augment(images[i % len(images)], config, rng)
        out[family] = round(1e3 * (time.process_time() - start) / per_family, 3)
    return out


def step_seconds(preset: str, ds: WordDataset, batch: int, steps: int) -> float:
    """Median CPU seconds of one training step of ``preset`` (gamma 1/2, Adam) on batches of ``ds``."""
    model = build_model(preset, KEY, 0.5)
    optimizer = make_optimizer(model, 2e-3, "adam")
    model.train()
    times = []
    for b in range(steps + 3):
        images, targets, _ = collate([ds[(b * batch + i) % len(ds)] for i in range(batch)])
        start = time.process_time()
        train_step(model, images, targets, optimizer)
        if b >= 3:  # the first steps allocate
            times.append(time.process_time() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    """Print (and with --out write) the data path's cost per batch beside a training step's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fedocr-cpu")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--ops", type=int, default=AugmentConfig.ops)
    parser.add_argument("--magnitude", type=float, default=AugmentConfig.magnitude)
    parser.add_argument("--prob", type=float, default=AugmentConfig.prob)
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = build_model(args.preset, KEY, 0.5).image_options
    config = AugmentConfig(args.ops, args.magnitude, args.prob)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "words"
        render_dataset(data, 400, seed=1, labels="words")
        plain = WordDataset(data, options["input_hw"], keep_aspect=options["keep_aspect"])
        augmented = WordDataset(data, options["input_hw"], keep_aspect=options["keep_aspect"], augment=config)
        read = batch_seconds(plain, args.batch_size, args.batches)
        read_aug = batch_seconds(augmented, args.batch_size, args.batches)
        families = family_seconds(plain, args.magnitude)
        step = step_seconds(args.preset, plain, args.batch_size, max(10, args.batches // 2))
    result = {
        "preset": args.preset, "input_hw": list(options["input_hw"]), "batch_size": args.batch_size,
        "augment": {"ops": config.ops, "magnitude": config.magnitude, "prob": config.prob},
        "data_ms_per_batch": round(1e3 * read, 2), "data_augmented_ms_per_batch": round(1e3 * read_aug, 2),
        "augmentation_ms_per_batch": round(1e3 * (read_aug - read), 2),
        "step_ms": round(1e3 * step, 1),
        "augmentation_share_of_step": round((read_aug - read) / step, 4),
        "data_path_share_of_step": round(read_aug / step, 4),
        "family_ms_per_image": families,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{args.preset} batch {args.batch_size} at {options['input_hw'][0]}x{options['input_hw'][1]}, one "
          f"thread (CPU ms): data {result['data_ms_per_batch']}, with augmentation "
          f"{result['data_augmented_ms_per_batch']} (+{result['augmentation_ms_per_batch']}); training step "
          f"{result['step_ms']}; augmentation {100 * result['augmentation_share_of_step']:.1f}% of a step, "
          f"whole data path {100 * result['data_path_share_of_step']:.1f}%")
    print("ms per image and op, by family: " + ", ".join(f"{k} {v}" for k, v in families.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
