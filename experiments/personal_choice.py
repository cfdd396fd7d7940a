"""`python -m experiments.personal_choice`: how an edge should choose its personal model.

Replays the personal model's last step (edge_agent: the final global model G fine-tuned on the
edge's shard for a few epochs, candidates G + w (F_e - G)) on the final
global models of finished `owners` federations, and compares rules that choose among the candidates
on the edge's validation set (300 images, as the edge has). Each choice is scored on a check set of
the owner's kind rendered with yet another seed, so no rule and no figure here touches the owners'
test sets. The fine-tune starts a fresh Adam (the edge's continues its own); one run each.

Rules (each can choose G itself):
- accuracy: the best word accuracy, ties by loss (the edge agent's rule);
- loss: the lowest loss;
- one-se: accuracy's choice, unless its gain over G is within one standard error of the paired
  difference of the two on the validation set (then G);
- full: the last epoch's fine-tune, w = 1, without looking;
- half: the last epoch's fine-tune, w = 0.5, without looking.

    python -m experiments.personal_choice --runs fedavgm-rehearsal,fedadam-rehearsal

With ``--edges`` it replays nothing: it scores the models a personalized federation's edges wrote
(final.npz and personal.npz), or each owner's model of a run of the owners alone, on the same check
sets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.agent import PERSONAL_MIXES
from experiments.owners import OWNERS, RUNS_BY_NAME, SCALES, render_owner, score
from fedocr.harness.services import KEY_FILE
from recognizer import metrics, state
from recognizer import train as tr
from recognizer.dataset import make_loader
from recognizer.keys import load_key
from recognizer.model_io import load_model
from recognizer.recipe import DEFAULT_LR

MIXES = PERSONAL_MIXES[1:]  # the edge agent's mixes but w = 0, which is the global model
GLOBAL = (0, 0.0)  # the candidate (epoch, w) that is the global model itself


@dataclass(frozen=True)
class Scored:
    """A candidate on one set: word accuracy, loss and which images it read."""

    accuracy: float
    loss: float
    correct: np.ndarray

    @classmethod
    def of(cls, model: torch.nn.Module, loader) -> Scored:
        r = tr.evaluate(model, loader, beam_width=1)
        pairs = zip(r.predictions, r.labels, strict=True)
        hits = [metrics.normalize(p) == metrics.normalize(t) for p, t in pairs]  # as word_accuracy counts
        return cls(r.accuracy, r.loss, np.array(hits, dtype=bool))


def _one_se(val: dict, best: tuple) -> tuple:
    """``best`` unless its validation gain over the global model is within one standard error."""
    g, c = val[GLOBAL].correct, val[best].correct
    diff = c.astype(float) - g.astype(float)
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    return best if diff.mean() > se else GLOBAL


RULES: dict[str, Callable[[dict, int], tuple]] = {
    "accuracy": lambda val, n: max(val, key=lambda k: (val[k].accuracy, -val[k].loss, -k[0], -k[1])),
    "loss": lambda val, n: min(val, key=lambda k: val[k].loss),
    "one-se": lambda val, n: _one_se(val, RULES["accuracy"](val, n)),
    "full": lambda val, n: (n, 1.0),
    "half": lambda val, n: (n, 0.5),
}


def replay(final: Path, key: bytes, shard: Path, sets: dict[str, Path], epochs: int, batch_size: int,
           seed: int, lr: float = DEFAULT_LR["adam"]) -> dict[str, dict[tuple, Scored]]:  # fmt: skip
    """Fine-tune ``final`` on ``shard`` at ``lr`` and score every candidate (epoch, w) on each named set."""
    model, _ = load_model(final, key)
    g = state.pack_model(model, key)
    options = model.image_options
    loaders = {name: make_loader(path, 64, shuffle=False, **options) for name, path in sets.items()}
    scores = {name: {GLOBAL: Scored.of(model, ld)} for name, ld in loaders.items()}
    optimizer = tr.make_optimizer(model, lr, "adam")
    loader = make_loader(shard, batch_size, shuffle=True, seed=seed, **options)
    tuned = g
    for epoch in range(1, epochs + 1):
        state.load_packed(model, tuned, key)  # the fine-tune goes on from its last epoch, not a mix
        tr.train_epoch(model, loader, optimizer, epoch=epoch - 1)
        tuned = state.pack_model(model, key)
        for w in MIXES:
            state.load_packed(model, g + np.float32(w) * (tuned - g), key)
            for name, ld in loaders.items():
                scores[name][(epoch, w)] = Scored.of(model, ld)
    return scores


def score_edges(work: Path, run: str, check_words: int) -> list[dict]:
    """Each owner's generic (final.npz) and personal (personal.npz) model on its check set; for a run
    of the owners alone, each owner's model (its "own")."""
    cases = []
    alone = run in RUNS_BY_NAME and RUNS_BY_NAME[run].kind == "alone"
    what = "a finished owners run" if alone else "a finished, personalized owners run"
    for k, owner in enumerate(OWNERS):
        check = _check_set(work / "data", owner, k, check_words, SCALES["owners"].seed)
        case = {"run": run, "owner": owner.name}
        for name in ("own",) if alone else ("final", "personal"):
            model = _run_model(work, run, owner.name, name, what)
            case[name] = score(model, work / KEY_FILE, {owner.name: check})[owner.name]
        cases.append(case)
        print(json.dumps(case), flush=True)
    return cases


def _run_model(work: Path, run: str, owner: str, name: str, what: str) -> Path:
    """The model file ``name``.npz that ``owner``'s edge wrote in ``run``, or with ``name`` "own" the
    owner's model in a run of the owners alone (experiments.owners.run_alone); FileNotFoundError if none."""
    home = work / "runs" / run
    path = home / f"{owner}.npz" if name == "own" else home / "edges" / owner / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run} {what}?")
    return path


def _check_set(data: Path, owner, k: int, words: int, seed: int) -> Path:
    """The owner's check set: ``words`` images of its kind from a seed no other set uses."""
    check = data / "check" / owner.name
    check.parent.mkdir(parents=True, exist_ok=True)
    render_owner(check, owner, words, seed + 7000 + 10 * k)
    return check


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.personal_choice",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="comma-separated finished owners federations")
    p.add_argument("--work", type=Path, default=Path("runs/owners"), help="the owners scale's --work")
    p.add_argument("--check-words", type=int, default=1000, help="images of each owner's check set")
    p.add_argument("--epochs", type=int, default=8, help="the fine-tune's epochs (edge agent: 8; until "
                   "2026-12-07, 4)")  # fmt: skip
    p.add_argument("--lr", type=float, default=DEFAULT_LR["adam"],
                   help="the fine-tune's lr (edge agent: %(default)g; until 2026-12-07, a tenth of it)")
    p.add_argument("--owners", help="comma-separated owners to replay (default: all)")
    p.add_argument("--edges", action="store_true", help="score the edges' own final and personal models (or "
                   "the owners' models alone) on the check sets instead (default --out: "
                   "results/owners/personal-check.json)")  # fmt: skip
    p.add_argument("--out", type=Path, help="default: results/owners/personal-choice.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    try:
        return _check_edges(args) if args.edges else _study(args)
    except FileNotFoundError as exc:
        print(f"personal_choice: {exc}", file=sys.stderr)
        return 2


def _check_edges(args: argparse.Namespace) -> int:
    """--edges: score the edges' own final and personal models (or the owners' models alone), write
    them and print the table."""
    out = args.out or Path("results/owners/personal-check.json")
    cases = [c for run in args.runs.split(",") for c in score_edges(args.work, run, args.check_words)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": cases, "check_words": args.check_words,
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")  # fmt: skip
    print("\n| run | owner | generic | personal | gain (pt) |\n|---|---|---|---|---|")
    for c in cases:
        if "own" in c:  # an owner alone: its one model
            print(f"| {c['run']} | {c['owner']} | {100 * c['own']['accuracy']:.1f} (alone) | - | - |")
            continue
        gain = 100 * (c["personal"]["accuracy"] - c["final"]["accuracy"])
        print(f"| {c['run']} | {c['owner']} | {100 * c['final']['accuracy']:.1f} "
              f"| {100 * c['personal']['accuracy']:.1f} | {gain:+.1f} |")
    return 0


def _study(args: argparse.Namespace) -> int:
    """Replay each run's last personalization step per owner, compare the rules, write after each case."""
    scale = SCALES["owners"]
    args.out = args.out or Path("results/owners/personal-choice.json")
    key = load_key(args.work / KEY_FILE)
    data = args.work / "data"
    cases = []
    for run in args.runs.split(","):
        for k, owner in enumerate(OWNERS):
            if args.owners and owner.name not in args.owners.split(","):
                continue
            final = _run_model(args.work, run, owner.name, "final", "a finished owners federation")
            check = _check_set(data, owner, k, args.check_words, scale.seed)
            started = time.monotonic()
            scores = replay(final, key, data / "shards" / owner.name,
                            {"val": data / "val" / owner.name, "check": check}, args.epochs, scale.batch_size,
                            scale.seed + k, args.lr)  # fmt: skip
            generic = scores["check"][GLOBAL]
            case = {"run": run, "owner": owner.name, "generic_val": scores["val"][GLOBAL].accuracy,
                    "generic_check": generic.accuracy, "seconds": time.monotonic() - started,
                    "rules": {}}  # fmt: skip
            for rule, choose in RULES.items():
                chosen = choose(scores["val"], args.epochs)
                case["rules"][rule] = {"epoch": chosen[0], "w": chosen[1],
                                       "val": scores["val"][chosen].accuracy,
                                       "check": scores["check"][chosen].accuracy,
                                       "check_loss": scores["check"][chosen].loss}  # fmt: skip
            cases.append(case)
            print(json.dumps(case), flush=True)
            # After every case, so a stopped study keeps what it measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"cases": cases, "check_words": args.check_words,
                                            "epochs": args.epochs, "lr": args.lr,
                                            "date": time.strftime("%Y-%m-%d")},
                                           indent=2) + "\n")  # fmt: skip
    print("\n| rule | cases at or above the generic model | mean gain (pt) | least gain (pt) |")
    print("|---|---|---|---|")
    for rule in RULES:
        gains = [100 * (c["rules"][rule]["check"] - c["generic_check"]) for c in cases]
        print(f"| {rule} | {sum(g >= 0 for g in gains)} of {len(gains)} | {np.mean(gains):+.1f} "
              f"| {min(gains):+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
