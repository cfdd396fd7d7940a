"""Encrypted images: what the key's model transformation costs, and what an observer of encrypted crops
can do (recognizer/image_crypt.py).

Run: .venv/bin/python -m benchmarks.encryption --model MODEL.npz [--key MODEL.key] --data HELD_OUT
     [--count 300] [--name NAME] [--figure docs/results/encrypted-crops.png]

MODEL is a vit-preset model trained on plain images (for instance `python -m benchmarks.learning --rows
vitstr-tiny --models runs/learning-models`). Rows, each on the first --count images of --data, greedy:

- the plain model on plain images, and on images encrypted with an image key (all four transforms);
- the transformed model (encrypt-model) on the encrypted images, with the largest logit difference
  from the plain model on the plain images; and on images encrypted with another key;
- a jigsaw attack on the block scrambling (greedy placement of blocks by how well their borders
  match, as published attacks on block scrambling do): the fraction of blocks put back in place and
  the plain model's accuracy on the reassembled images, against images encrypted by block
  scrambling alone and by all four transforms.

Prints the table and writes results/encryption/NAME.json; --figure writes a PNG of a few crops: plain,
encrypted by block scrambling alone, by all four transforms, and the attack's reassembly of the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recognizer.dataset import array_to_tensor, image_to_array
from recognizer.image_crypt import BlockCipher, EncryptionOptions, encrypt_model
from recognizer.keys import load_key
from recognizer.lmdb_data import LmdbReader
from recognizer.metrics import word_accuracy
from recognizer.model import Recognizer
from recognizer.model_io import load_model

IMAGE_KEY, OTHER_KEY = bytes(range(100, 132)), bytes(range(200, 232))  # fixed: the figures are repeatable


def _blocks(x: np.ndarray, p: int) -> np.ndarray:
    """[H, W, 3] -> [L, P, P, 3], row-major."""
    h, w, _ = x.shape
    return x.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p, p, 3)


def _image(blocks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    p = blocks.shape[1]
    return blocks.reshape(gh, gw, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * p, gw * p, 3)


def jigsaw(x: np.ndarray, p: int, grid: tuple[int, int]) -> np.ndarray:
    """The greedy reassembly of a block-scrambled image: for every block as the top-left one, fill the
    grid row by row with the unused block whose left and top borders best continue its neighbours'
    (sum of squared differences), and keep the placement of least total cost. Returns, per grid
    position, the index of the block put there."""
    b = _blocks(x.astype(np.float32), p)
    n = len(b)
    right, left, bottom, top = b[:, :, -1], b[:, :, 0], b[:, -1], b[:, 0]
    lr = ((right[:, None] - left[None]) ** 2).sum((2, 3))  # [i, j]: j right of i
    tb = ((bottom[:, None] - top[None]) ** 2).sum((2, 3))  # [i, j]: j below i
    gh, gw = grid
    best, best_cost = None, np.inf
    for start in range(n):
        used = np.zeros(n, dtype=bool)
        order, cost = [start], 0.0
        used[start] = True
        for pos in range(1, n):
            r, c = divmod(pos, gw)
            score = np.zeros(n, dtype=np.float64)
            if c:
                score += lr[order[pos - 1]]
            if r:
                score += tb[order[pos - gw]]
            score[used] = np.inf
            pick = int(score.argmin())
            order.append(pick)
            used[pick] = True
            cost += score[pick]
            if cost >= best_cost:
                break
        else:
            best, best_cost = order, cost
    return np.array(best)


def _accuracy(model: Recognizer, images: list[np.ndarray], labels: list[str]) -> tuple[float, torch.Tensor]:
    batch = torch.stack([array_to_tensor(x) for x in images])
    with torch.no_grad():
        ids = model.predict(batch, beam_width=1)
    texts = [model.alphabet.decode(i) for i in ids]
    return word_accuracy(texts, labels), batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.encryption", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--key", type=Path, help="federation key (default: MODEL with .key)")
    p.add_argument("--data", type=Path, required=True, help="held-out LMDB")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--name", default="encryption")
    p.add_argument("--figure", type=Path)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_model(args.model, load_key(args.key or args.model.with_suffix(".key")))
    c = model.config
    reader = LmdbReader(args.data)
    count = min(args.count, len(reader))
    plain, labels = [], []
    for i in range(count):
        image, label, _ = reader.get(i)
        plain.append(image_to_array(image, c.input_hw, c.keep_aspect))
        labels.append(label)
    full = BlockCipher.for_model(IMAGE_KEY, model)
    blocks_only = BlockCipher.for_model(IMAGE_KEY, model, EncryptionOptions.parse("blocks"))
    other = BlockCipher.for_model(OTHER_KEY, model)
    encrypted = [full.encrypt(x) for x in plain]
    transformed = encrypt_model(model, IMAGE_KEY)

    rows: dict[str, dict] = {}
    acc, plain_batch = _accuracy(model, plain, labels)
    rows["plain model, plain images"] = {"accuracy": acc}
    rows["plain model, encrypted images"] = {"accuracy": _accuracy(model, encrypted, labels)[0]}
    acc, enc_batch = _accuracy(transformed, encrypted, labels)
    with torch.no_grad():
        targets = torch.full((min(64, count), 1), 1, dtype=torch.long)  # one teacher-forced step: EOS in
        diff = (model(plain_batch[:64], targets) - transformed(enc_batch[:64], targets)).abs().max().item()
    rows["transformed model, encrypted images"] = {"accuracy": acc, "max_abs_logit_difference": diff}
    wrong = [other.encrypt(x) for x in plain]
    rows["transformed model, images encrypted with another key"] = {
        "accuracy": _accuracy(transformed, wrong, labels)[0]
    }
    grid, patch = model.encoder.grid, c.vit_patch
    reassembled: dict[str, list[np.ndarray]] = {}
    for name, cipher in (("block scrambling alone", blocks_only), ("all four transforms", full)):
        started = time.process_time()
        in_place, neighbours, rebuilt = [], [], []
        for x in plain:
            scrambled = cipher.encrypt(x)
            order = jigsaw(scrambled, patch, grid)
            # Where each block truly belongs: the scrambled image's block i is the plain block block_order[i].
            truth = cipher.block_order[order]  # the true place of the block put at each place
            in_place.append(float(np.mean(truth == np.arange(len(order)))))
            pairs = truth.reshape(grid)  # left-right pairs put side by side that truly are
            beside = (pairs[:, 1:] == pairs[:, :-1] + 1) & (pairs[:, 1:] % grid[1] != 0)
            neighbours.append(float(np.mean(beside)))
            rebuilt.append(_image(_blocks(scrambled, patch)[order], grid))
        reassembled[name] = rebuilt
        rows[f"jigsaw attack on {name}"] = {
            "blocks_in_place": float(np.mean(in_place)), "chance": 1 / (grid[0] * grid[1]),
            "right_neighbours_right": float(np.mean(neighbours)),
            "accuracy_of_plain_model_on_reassembled": _accuracy(model, rebuilt, labels)[0],
            "cpu_s_per_image": (time.process_time() - started) / count,
        }
    report = {"model": str(args.model), "preset": meta["preset"], "gamma": meta["gamma"],
              "data": str(args.data), "count": count, "date": time.strftime("%Y-%m-%d"),
              "rows": rows}  # fmt: skip
    out = Path("results/encryption") / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{meta['preset']} (gamma {meta['gamma']}) on {count} images of {args.data}:")
    for name, row in rows.items():
        print(f"  {name:<58} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if args.figure:
        _figure(args.figure, plain[:4], [blocks_only.encrypt(x) for x in plain[:4]], encrypted[:4],
                reassembled["block scrambling alone"][:4])  # fmt: skip
        print(f"wrote {args.figure}")
    return 0


def _figure(path: Path, *columns: list[np.ndarray]) -> None:
    """Rows of crops: plain, blocks alone, all four transforms, the attack's reassembly; 3x, 4 px apart."""
    from PIL import Image

    h, w, _ = columns[0][0].shape
    gap = 4
    canvas = np.full((len(columns[0]) * (h + gap) - gap, len(columns) * (w + gap) - gap, 3), 255, np.uint8)
    for col, images in enumerate(columns):
        for row, x in enumerate(images):
            canvas[row * (h + gap): row * (h + gap) + h, col * (w + gap): col * (w + gap) + w] = x
    path.parent.mkdir(parents=True, exist_ok=True)
    big = (canvas.shape[1] * 3, canvas.shape[0] * 3)
    Image.fromarray(canvas).resize(big, Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
