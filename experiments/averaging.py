"""`python -m experiments.averaging`: does averaging keep a from-scratch model's take-off?

Simulates the warm-up rounds of a federation in one process: ``--edges`` models start from the same
W_0, each trains on its own rendered words (clean and rotated dictionary words, as the owners'
warm-up), and every ``--round-steps`` local steps they are replaced by their mean, as FedAvg does
(each edge keeps its Adam state, as an edge agent does). Prints the mean model's word accuracy and
loss on held-out words of the same kind at the first mean past each 250 steps, and at the end each
edge's own model before the last mean. ``--round-steps`` equal to ``--steps`` is one long round:
models trained apart, then averaged once. ``--server-lr`` moves the parameters by that multiple of
the mean increment, as FedAvg with a server learning rate (the aggregator's fedavgm at momentum 0);
the running statistics take the plain mean.

    python -m experiments.averaging --edges 2 --round-steps 250 --steps 2500
    python -m experiments.averaging --edges 2 --round-steps 1500 --steps 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from recognizer import state
from recognizer import train as tr
from recognizer.dataset import make_loader
from recognizer.model import build_model, resolve_preset
from recognizer.synth import render_dataset

KEY = bytes(range(32))  # every edge starts from the same W_0


def _batches(path: Path, batch_size: int, options: dict) -> Iterator:
    while True:
        yield from make_loader(path, batch_size, shuffle=True, drop_last=True, **options)


def mean_state(models: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The element-wise mean of models' exported state (``state.export_state``: what an edge uploads
    and FedAvg averages; integer buffers stay each model's own)."""
    exported = [state.export_state(m) for m in models]
    return [(sum(ts[k].double() for ts in exported) / len(exported)).float() for k in range(len(exported[0]))]


def server_step(
    old: list[torch.Tensor], mean: list[torch.Tensor], lr: float, params: int
) -> list[torch.Tensor]:
    """``old + lr * (mean - old)`` for the first ``params`` tensors (the parameters), ``mean`` for the
    rest (the running statistics)."""
    return [o + lr * (m - o) if k < params else m for k, (o, m) in enumerate(zip(old, mean, strict=True))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.averaging", description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--round-steps", type=int, default=250, help="local steps between two means")
    p.add_argument("--steps", type=int, default=2500, help="local steps of each edge in all")
    p.add_argument("--words", type=int, default=12000, help="warm-up words each edge renders")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--server-lr", type=float, default=1.0, help="multiple of the mean increment applied")
    p.add_argument("--work", type=Path, default=Path("runs/averaging"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    held_out = args.work / "held-out"
    if not (held_out / "data.mdb").exists():
        render_dataset(held_out, 300, 777, ["clean", "rotated"], labels="words", overwrite=True)
    torch.manual_seed(0)
    glob = build_model(resolve_preset("fedocr-cpu"), KEY, 0.5)
    options = glob.image_options
    val = make_loader(held_out, 100, shuffle=False, **options)
    edges = []
    for k in range(args.edges):
        data = args.work / f"edge{k}-{args.words}"
        if not (data / "data.mdb").exists():
            render_dataset(data, args.words, 101 + k, ["clean", "rotated"], labels="words", overwrite=True)
        model = copy.deepcopy(glob)
        edges.append((model, tr.make_optimizer(model, args.lr, "adam"), _batches(data, 16, options)))
    step, started, mean = 0, time.process_time(), state.export_state(glob)
    params = len(list(glob.parameters()))
    while step < args.steps:
        n = min(args.round_steps, args.steps - step)
        for model, optimizer, batches in edges:
            state.load_state(model, mean)
            model.train()
            for _ in range(n):
                images, targets, _ = next(batches)
                tr.train_step(model, images, targets, optimizer)
        step += n
        mean = server_step(mean, mean_state([m for m, _, _ in edges]), args.server_lr, params)
        state.load_state(glob, mean)
        if step // 250 > (step - n) // 250 or step == args.steps:  # the first mean past each 250 steps
            r = tr.evaluate(glob, val, beam_width=1)
            print(json.dumps({"round_steps": args.round_steps, "server_lr": args.server_lr, "step": step,
                              "mean_model_accuracy": round(r.accuracy, 3),
                              "mean_model_loss": round(r.loss, 3),
                              "cpu_s": round(time.process_time() - started)}), flush=True)  # fmt: skip
    for k, (model, _, _) in enumerate(edges):
        r = tr.evaluate(model, val, beam_width=1)
        print(json.dumps({"edge": k, "accuracy": round(r.accuracy, 3), "loss": round(r.loss, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
