"""The same federation on plain and on encrypted images: does training on encrypted crops cost accuracy?

Run: .venv/bin/python -m benchmarks.encrypted_federation [--edges 3] [--rounds 8] [--local-epochs 3]
     [--train-words 2400] [--test-words 300] [--labels digits] [--styles clean] [--work-dir DIR]

Two real federations (one aggregator and --edges edge agents over mutual TLS on 127.0.0.1) of
`vitstr-tiny-seq` (or --preset) at gamma 1/2, on the same shards, key, plan and seeds: one on the
plain images, one whose edges encrypt their shards with a common image key (`edge_agent --image-key`;
the transforms of --transforms, all four by default). The encrypted edges train a model aligned to
the image key (recognizer.image_crypt.align_model), whose model file keeps the plain meaning; the
model that reads encrypted queries is made from it with `recognizer encrypt-model`, as a service
would be given it, and scored on the encrypted held-out set. The plain federation's model is scored
on the plain set, and on the encrypted set as it is. Prints the table and writes
results/encrypted_federation/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from experiments.demo import DataSpec, evaluate, make_data
from fedocr.harness import PY, LocalFederation, Settings, make_key, make_pki, run_command, stop_on_signals
from recognizer.image_crypt import EncryptionOptions, cipher_for_preset, encrypt_dataset
from recognizer.keys import load_key, write_key
from recognizer.model import resolve_preset

# vitstr-tiny-seq: the transformer preset that reads (docs/results/encryption.md); vitstr-tiny, whose
# decoder ignores the tokens' order, stayed on its plateau.
PRESET, GAMMA = "vitstr-tiny-seq", "1/2"
IMAGE_KEY = bytes(range(100, 132))


def federate(work: Path, pki: Path, key: Path, shards: list[Path], test: Path, settings: Settings,
             timeout_s: float) -> float:  # fmt: skip
    """Run one federation to its end; returns its wall seconds."""
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    with LocalFederation(work, pki, key, settings) as fed:
        fed.start_aggregator(len(shards))
        for k, shard in enumerate(shards):
            fed.start_edge(f"edge-{k}", shard, val=test if k == 0 else None)
        fed.wait_edges(timeout_s)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.encrypted_federation", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=PRESET, help=f"a vit preset (default {PRESET})")
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--train-words", type=int, default=2400)
    p.add_argument("--test-words", type=int, default=300)
    p.add_argument("--labels", default="digits")
    p.add_argument("--styles", default="clean")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--work-dir", type=Path, default=Path("runs/encrypted-federation"))
    p.add_argument("--name", default="encrypted_federation")
    p.add_argument("--transforms", default="all",
                   help="the encryption transforms (edge_agent --image-transforms; default all)")
    p.add_argument("--runs", default="plain,encrypted", help="which federations to run (default both)")
    args = p.parse_args(argv)
    stop_on_signals()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = DataSpec(args.train_words, args.test_words, args.styles, args.labels)
    shards, test = make_data(work, args.edges, spec)
    pki, key = make_pki(work / "pki", args.edges), make_key(work)
    image_key = work / "image.key"
    if not image_key.exists():
        write_key(image_key, IMAGE_KEY)
    config = resolve_preset(args.preset)
    options = EncryptionOptions.parse(args.transforms)
    encrypted_test = work / "data" / f"test-encrypted-{options.describe().replace(',', '-')}"
    if not (encrypted_test / "data.mdb").exists():
        shutil.rmtree(encrypted_test, ignore_errors=True)
        cipher = cipher_for_preset(load_key(image_key), args.preset, options)
        encrypt_dataset(test, encrypted_test, cipher, config.input_hw, config.keep_aspect)
    base = dict(rounds=args.rounds, local_epochs=args.local_epochs, preset=args.preset, gamma=GAMMA,
                lr=args.lr, batch_size=16, optimizer="adam", deadline_s=3600.0)  # fmt: skip
    runs = {
        "plain": (Settings(**base), test),
        "encrypted": (Settings(**base, extra_edge_args=("--image-key", str(image_key), "--image-transforms",
                                                        options.describe())), test),
    }
    runs = {name: run for name, run in runs.items() if name in args.runs.split(",")}
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d"),
                    "preset": args.preset, "gamma": GAMMA, "transforms": options.describe()}  # fmt: skip
    for name, (settings, val) in runs.items():
        home = work / name
        seconds = federate(home, pki, key, shards, val, settings, args.rounds * settings.deadline_s)
        model = home / "edges" / "edge-0" / "final.npz"
        if name == "encrypted":  # the serving model: the file transformed with the image key
            served = home / "served.npz"
            run_command([PY, "-m", "recognizer.cli", "encrypt-model", "--model", str(model), "--key",
                         str(key), "--image-key", str(image_key), "--transforms", options.describe(),
                         "--out", str(served)])  # fmt: skip
            report[name] = {"seconds": seconds, "own": evaluate(served, key, encrypted_test),
                            "file_on_plain": evaluate(model, key, test)}  # fmt: skip
        else:
            report[name] = {"seconds": seconds, "own": evaluate(model, key, test),
                            "on_encrypted": evaluate(model, key, encrypted_test)}  # fmt: skip
        print(f"{name}: {100 * report[name]['own']['accuracy']:.1f}% in {seconds:.0f} s", flush=True)
    accuracy = {name: report[name]["own"]["accuracy"] for name in runs}
    if len(accuracy) == 2:
        report["difference_pt"] = 100 * (accuracy["encrypted"] - accuracy["plain"])
    out = Path("results/encrypted_federation") / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    shown = ("plain", "encrypted", "difference_pt")
    print(json.dumps({k: report[k] for k in shown if k in report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
