"""`python -m experiments.owners` (`make owners`): four owners who differ, alone and federated.

Each owner holds a small shard of its own kind of text (receipts: digits and codes at low
resolution; signs: curved words in perspective; meters: blurred, noisy digits; tags: outlined codes
in perspective) and a held-out set of the same kind. Warm-up data are clean and rotated dictionary
words, which no owner holds. Every run has the same total rounds and local epochs:

- alone, from scratch and from the warm-up model (trained on one edge's warm-up words, as an owner
  alone could do);
- federated FedAvg without warm-up and with it; with warm-up: FedAvgM, FedAdam, FedProx, and
  personalization (each edge's personal model beside the generic one);
- the `mini` data (digits of every style) split IID and Dirichlet(alpha) over style families, without
  warm-up: FedAvg on both, and the better of FedAvgM and FedAdam on the Dirichlet split.

Federations are real processes (one aggregator and an edge agent per owner over mutual TLS on
127.0.0.1). Each finished run leaves results/owners/RUN.json and is not repeated, so an interrupted
run goes on where it stopped; `--report-only` prints the tables from the files.

    python -m experiments.owners [--scale owners|smoke] [--runs fedavg-warmup,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fedocr.harness import PY, LocalFederation, Settings, list_rounds, make_key, make_pki, spawn
from fedocr.harness.processes import stop_on_signals
from recognizer.dataset import make_loader
from recognizer.keys import load_key
from recognizer.lmdb_data import LmdbReader, LmdbWriter
from recognizer.model_io import load_model
from recognizer.shard import split_dataset
from recognizer.synth import STYLES, render_dataset
from recognizer.train import evaluate

log = logging.getLogger("experiments.owners")


@dataclass(frozen=True)
class Part:
    """A share of an owner's words: a label kind (recognizer.synth.LABEL_KINDS) in some styles."""

    labels: str
    styles: str  # comma-separated style families
    share: float


@dataclass(frozen=True)
class Owner:
    """One data owner: its kind of text and how many labelled crops it holds."""

    name: str
    kind: str
    words: int
    parts: tuple[Part, ...]


OWNERS: tuple[Owner, ...] = (
    Owner("receipts", "digits and codes, low resolution", 1200,
          (Part("digits", "lowres", 0.6), Part("mixed", "lowres,noisy", 0.4))),
    Owner("signs", "words, curved and in perspective", 600, (Part("words", "curved,perspective", 1.0),)),
    Owner("meters", "digits, blur and noise", 1500, (Part("digits", "blur,noisy", 1.0),)),
    Owner("tags", "codes and words, outlined, in perspective", 400,
          (Part("mixed", "outlined,perspective", 0.7), Part("digits", "outlined", 0.3))),
)  # fmt: skip


@dataclass(frozen=True)
class OwnersScale:
    """Sizes and schedule of one owners experiment; every run trains rounds x local_epochs epochs."""

    name: str
    # 16 rounds of 1 local epoch: the owners alone train the same 16 epochs as before with 8 of 2, and
    # a federation averages after at most 94 local steps (meters' shard) instead of 188.
    rounds: int = 16
    local_epochs: int = 1
    # Eight warm-up rounds of 4,500 words per edge: 281 local steps a round, 2,250 in all. Models
    # trained apart from the same start for 1,500 steps on different words read nothing when averaged
    # (0% and a loss of 2.4-2.7 on held-out warm-up words, against 1.3-2.0 for each alone; measured
    # 2026-12-07 with two and three models), so one long warm-up round only resets the take-off
    # (results/owners/earlier: one round of 12,000 words +0.8 pt over no warm-up, 3 of 4,000 -1.3 pt,
    # 2 of 6,000 -4.2 pt). Averaged every 125-250 steps, two edges took off like one model alone, at
    # about 2,000 steps on these words.
    warmup_rounds: int = 8
    warmup_words: int = 4500
    warmup_styles: str = "clean,rotated"
    warmup_labels: str = "words"
    cosine_from_round: int = 11  # 1-based round from which the lr falls along a cosine (0: constant)
    # The mini data keep their schedule of 2026-12-04: 8 rounds of 2 local epochs, cosine from round 6.
    mini_rounds: int = 8
    mini_local_epochs: int = 2
    mini_cosine_from_round: int = 6
    size: float = 1.0  # owners' shards are Owner.words x size
    test_words: int = 300  # per owner
    val_words: int = 300  # per owner: the edge's --val (its round scores, its personal model's choice)
    mini_words: int = 3000  # the mini data: digits of every style, split among mini_edges
    mini_edges: int = 3
    mini_test_words: int = 600
    alpha: float = 0.1
    preset: str = "fedocr-cpu"
    gamma: str = "1/2"
    optimizer: str = "adam"
    lr: float = 2e-3
    batch_size: int = 16
    # FedProx's mu. The edges train with Adam, which scales each parameter's step by the size of its
    # gradient, the proximal pull's included: at 0.01 the federation stalled at a loss of 2 (6.7%), at
    # 0.001 it learned (50.6%; both with their own warm-up, measured 2026-12-07).
    proximal_mu: float = 0.001
    seed: int = 20261204

    @property
    def epochs(self) -> int:
        """Epochs of every run: rounds x local epochs."""
        return self.rounds * self.local_epochs


SCALES = {
    "owners": OwnersScale("owners"),
    # Checks the whole pipeline in about a minute a run (a test runs some of it): not a result.
    "smoke": OwnersScale("owners-smoke", rounds=2, local_epochs=1, warmup_rounds=1, warmup_words=32,
                         cosine_from_round=0, mini_rounds=2, mini_local_epochs=1, mini_cosine_from_round=0,
                         size=0.04, test_words=16, val_words=12, mini_words=48,
                         mini_edges=2, mini_test_words=16, preset="fedocr-tiny", batch_size=8),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One row of the experiment."""

    name: str
    label: str
    kind: str  # "alone", "federated", or "warmup" (the federations' shared warm-up rounds)
    warmup: bool = False
    server_optimizer: str = "fedavg"
    server_lr: float = 0.0  # 0: the aggregator's default for that optimizer
    server_beta1: float = 0.0  # its momentum or first-moment decay (0: the aggregator's default)
    server_tau: float = 0.0  # fedadam's floor under sqrt(v) (0: the aggregator's default)
    proximal: bool = False
    proximal_mu: float = 0.0  # with proximal: this mu (0: the scale's proximal_mu)
    personalize: bool = False
    own_models: bool = False  # with personalize: each edge's own model (Ditto) is a candidate too
    # With personalize: the personal model's last fine-tune, of the final global model, its epochs and
    # lr (the edge agent's defaults until the evening of 2026-12-07, at which the personalized runs in
    # results/owners before personal-tune8-rehearsal were measured).
    personal_epochs: int = 4
    personal_lr: float = 2e-4
    # With warmup: after the warm-up rounds each edge's epochs also go over this many of its warm-up
    # words per shard image, drawn anew each round, so the federation keeps its words (0: off).
    rehearsal: float = 0.0
    extra: bool = False  # measured apart, outside the scale's 2 hours: run only when named in --runs
    data: str = "owners"  # "owners", or the mini data split "iid" or "dirichlet"
    best_optimizer: bool = False  # the server optimizer of the best SERVER_OPTIMIZER_RUNS row, not its own
    # The training after warm-up, times this: the mini data's rounds, or alone the epochs on the shard
    # (and the round or epoch its cosine starts from).
    length: int = 1


WARMUP = "warmup-federation"

# The rounds after warm-up rehearse twice as many warm-up words as each shard holds (Run.rehearsal): without
# it the federation forgets the words it was warmed up on (signs, the one owner of words, read 0.0% in
# every federation that did not rehearse; rehearsal 0.5, 1 and 2 measured 2026-12-07 as extra runs).
REHEARSAL = 2.0

RUNS: tuple[Run, ...] = (
    Run("alone-scratch", "each owner alone, from scratch", "alone"),
    Run("alone-warmup", "each owner alone, from the warm-up model", "alone", warmup=True),
    # As many local steps on the shard as a federation that rehearses twice the shard in its rounds.
    Run("alone-warmup-3x", "each owner alone, from the warm-up model, 3x the epochs on its shard", "alone",
        warmup=True, length=3, extra=True),
    Run("fedavg", "federated FedAvg, no warm-up", "federated"),
    # The warm-up rounds run once, as FedAvg; every federation with warm-up goes on from their final state
    # (shared_warmup), so its server optimizer, mu and personalization act on the owners' rounds.
    Run(WARMUP, "the shared warm-up rounds, FedAvg (the model they end at)", "warmup", warmup=True),
    # FedAvg with warm-up is this run's generic model: personalization does not change the upload
    # (fedavg-warmup and personal-warmup, measured 2026-12-07, read the same to the image). The personal
    # model's last fine-tune is as long as the owners' rounds, at the lr they start at (the edge agent's
    # defaults since 2026-12-07): meters read less federated than alone, and 8 epochs at 2e-3 lifted its
    # personal model from 81.0% (4 epochs at 2e-4, personal-rehearsal2-warmup) to 87.0%.
    Run("personal-tune8-rehearsal", "FedAvg, warm-up rehearsed 2:1, personalization", "federated",
        warmup=True, rehearsal=REHEARSAL, personalize=True, personal_epochs=8, personal_lr=2e-3),
    # Server momentum 0.5 and a steady, small increment move the state as far as FedAvg's does:
    # lr / (1 - momentum) = 1 for FedAvgM, and lr = tau for FedAdam, whose steps are capped only where
    # |mean| >> tau. At the aggregator's defaults (FedAvgM lr 1, momentum 0.9; FedAdam lr 0.01, tau 0.001)
    # neither left the plateau in 8 rounds (measured 2026-12-04, results/owners/three-warmup-rounds).
    Run("fedavgm-rehearsal", "FedAvgM, warm-up rehearsed 2:1", "federated", warmup=True, rehearsal=REHEARSAL,
        server_optimizer="fedavgm", server_lr=0.5, server_beta1=0.5),
    Run("fedadam-rehearsal", "FedAdam, warm-up rehearsed 2:1", "federated", warmup=True, rehearsal=REHEARSAL,
        server_optimizer="fedadam", server_lr=0.02, server_beta1=0.5, server_tau=0.02),
    Run("fedprox-rehearsal", "FedProx, warm-up rehearsed 2:1", "federated", warmup=True, rehearsal=REHEARSAL,
        proximal=True),
    Run("mini-iid", "mini data, IID, FedAvg", "federated", data="iid"),
    Run("mini-dirichlet", "mini data, Dirichlet, FedAvg", "federated", data="dirichlet"),
    Run("mini-dirichlet-best", "mini data, Dirichlet, best server optimizer", "federated", data="dirichlet",
        best_optimizer=True),
    # Measured apart (the scale's rows until 2026-12-07, before rehearsal, and the variants around them).
    Run("fedavg-warmup", "federated FedAvg, warm-up", "federated", warmup=True, extra=True),
    Run("fedavgm-warmup", "FedAvgM, warm-up", "federated", warmup=True, server_optimizer="fedavgm",
        server_lr=0.5, server_beta1=0.5, extra=True),
    Run("fedadam-warmup", "FedAdam, warm-up", "federated", warmup=True, server_optimizer="fedadam",
        server_lr=0.02, server_beta1=0.5, server_tau=0.02, extra=True),
    Run("fedprox-warmup", "FedProx mu 0.01, warm-up", "federated", warmup=True, proximal=True,
        proximal_mu=0.01, extra=True),
    Run("fedprox-mu0.01-rehearsal", "FedProx mu 0.01, warm-up rehearsed 2:1", "federated", warmup=True,
        rehearsal=REHEARSAL, proximal=True, proximal_mu=0.01, extra=True),
    Run("personal-warmup", "FedAvg, warm-up, personalization", "federated", warmup=True, personalize=True,
        extra=True),
    Run("personal-own-warmup", "FedAvg, warm-up, personalization with own models", "federated", warmup=True,
        personalize=True, own_models=True, extra=True),
    Run("personal-rehearsal-warmup", "FedAvg, warm-up rehearsed, personalization", "federated", warmup=True,
        rehearsal=0.5, personalize=True, extra=True),
    Run("personal-rehearsal2-warmup", "FedAvg, warm-up rehearsed 2:1, personalization, last fine-tune 4 "
        "epochs at lr 2e-4", "federated", warmup=True, rehearsal=REHEARSAL, personalize=True, extra=True),
    Run("personal-rehearsal1-warmup", "FedAvg, warm-up rehearsed 1:1, personalization", "federated",
        warmup=True, rehearsal=1.0, personalize=True, extra=True),
    # Twice the rounds, so that both splits leave the plateau and the skew, not the take-off, decides.
    Run("mini-iid-long", "mini data, IID, FedAvg, twice the rounds", "federated", data="iid", length=2,
        extra=True),
    Run("mini-dirichlet-long", "mini data, Dirichlet, FedAvg, twice the rounds", "federated",
        data="dirichlet", length=2, extra=True),
    Run("mini-dirichlet-best-long", "mini data, Dirichlet, best server optimizer, twice the rounds",
        "federated", data="dirichlet", best_optimizer=True, length=2, extra=True),
)  # fmt: skip
RUN_NAMES = tuple(r.name for r in RUNS)
RUNS_BY_NAME = {r.name: r for r in RUNS}
EXTRA_RUNS = tuple(r.name for r in RUNS if r.extra)
SERVER_OPTIMIZER_RUNS = ("fedavgm-rehearsal", "fedadam-rehearsal")


# ---------------------------------------------------------------------------------------------- data


def render_owner(path: Path, owner: Owner, count: int, seed: int) -> None:
    """Render ``count`` words of ``owner``'s kind into one LMDB (its parts in their shares)."""
    if (path / "data.mdb").exists():
        return
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pieces = []
    left = count
    for k, part in enumerate(owner.parts):
        n = left if k == len(owner.parts) - 1 else round(count * part.share)
        left -= n
        piece = partial.with_name(f"{partial.name}.{k}")
        shutil.rmtree(piece, ignore_errors=True)
        render_dataset(piece, n, seed + k, part.styles.split(","), labels=part.labels, progress=None)
        pieces.append(piece)
    with LmdbWriter(partial) as writer:  # parts interleaved, so any prefix holds every part
        readers = [LmdbReader(p) for p in pieces]
        order = sorted((i / len(r), j, i) for j, r in enumerate(readers) for i in range(len(r)))
        for _, j, i in order:
            writer.add(*readers[j].get_raw(i))
    for piece in pieces:
        shutil.rmtree(piece)
    partial.rename(path)


def _render(path: Path, count: int, seed: int, styles: str, labels: str) -> None:
    if (path / "data.mdb").exists():
        return
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    render_dataset(partial, count, seed, styles.split(","), labels=labels, progress=None)
    partial.rename(path)


@dataclass(frozen=True)
class OwnersData:
    """Paths of the rendered data."""

    shards: dict[str, Path]  # owner -> training shard
    tests: dict[str, Path]  # owner -> held-out set of its kind (the scores reported)
    vals: dict[str, Path]  # owner -> its edge's validation set of its kind (another seed)
    warmup: Path  # one edge's worth of warm-up words, for the owners alone
    mini_shards: dict[str, tuple[Path, ...]]  # "iid" / "dirichlet" -> shards of the mini data
    mini_test: Path


def make_data(root: Path, scale: OwnersScale) -> OwnersData:
    """Render (or find) every owner's shard and held-out set, the warm-up words and the mini data."""
    decisive = ("size", "test_words", "val_words", "warmup_words", "warmup_styles", "warmup_labels",
                "mini_words", "mini_edges", "mini_test_words", "alpha", "seed")  # fmt: skip
    settings = {k: v for k, v in asdict(scale).items() if k in decisive}
    settings = json.loads(json.dumps({**settings, "owners": [asdict(o) for o in OWNERS]}))  # as read back
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise ValueError(
            f"{root} holds data of other settings (settings.json): delete it or use another --work"
        )
    stamp.write_text(json.dumps(settings) + "\n")
    shards, tests, vals = {}, {}, {}
    for k, owner in enumerate(OWNERS):
        shards[owner.name] = root / "shards" / owner.name
        tests[owner.name] = root / "test" / owner.name
        vals[owner.name] = root / "val" / owner.name
        render_owner(shards[owner.name], owner, max(8, round(owner.words * scale.size)), scale.seed + 10 * k)
        render_owner(tests[owner.name], owner, scale.test_words, scale.seed + 1000 + 10 * k)
        render_owner(vals[owner.name], owner, scale.val_words, scale.seed + 5000 + 10 * k)
    warmup = root / "warmup"
    _render(warmup, scale.warmup_words, scale.seed + 2000, scale.warmup_styles, scale.warmup_labels)
    mini = root / "mini" / "train"
    _render(mini, scale.mini_words, scale.seed + 3000, ",".join(STYLES), "digits")
    mini_test = root / "mini" / "test"
    _render(mini_test, scale.mini_test_words, scale.seed + 4000, ",".join(STYLES), "digits")
    mini_shards = {}
    for split, mode in (("iid", "iid"), ("dirichlet", "dirichlet-style")):
        out = root / "mini" / split
        if not (out / "shard0" / "data.mdb").exists():
            shutil.rmtree(out, ignore_errors=True)
            split_dataset(mini, scale.mini_edges, out, mode, scale.seed, alpha=scale.alpha)
        mini_shards[split] = tuple(out / f"shard{k}" for k in range(scale.mini_edges))
    return OwnersData(shards, tests, vals, warmup, mini_shards, mini_test)


# ---------------------------------------------------------------------------------------------- runs


def score(model_file: Path, key: Path, sets: dict[str, Path]) -> dict[str, dict]:
    """Word accuracy, 1-NED and loss of a model file on each named set (greedy decoding)."""
    model, _ = load_model(model_file, load_key(key))
    out = {}
    for name, path in sets.items():
        r = evaluate(model, make_loader(path, 64, shuffle=False, **model.image_options), beam_width=1)
        out[name] = {
            "accuracy": r.accuracy,
            "char_accuracy": r.char_accuracy,
            "loss": r.loss,
            "samples": r.samples,
        }
    return out


def _train_command(scale: OwnersScale, data: Path, out: Path, key: Path, epochs: int, cosine_from: int | None,
                   init: Path | None = None) -> list[str]:  # fmt: skip
    cmd = [
        PY,
        "-m",
        "recognizer.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--key",
        str(key),
        "--preset",
        scale.preset,
        "--gamma",
        scale.gamma,
        "--epochs",
        str(epochs),
        "--optimizer",
        scale.optimizer,
        "--lr",
        str(scale.lr),
        "--batch-size",
        str(scale.batch_size),
        "--threads",
        "1",
    ]
    if cosine_from is not None:
        cmd += ["--cosine-from", str(cosine_from)]
    return cmd + (["--init", str(init)] if init is not None else [])


def _cosine_from(scale: OwnersScale, skipped_rounds: int = 0) -> int | None:
    """The federation's cosine round as an epoch of a run that starts ``skipped_rounds`` rounds in."""
    if not scale.cosine_from_round:
        return None
    return (scale.cosine_from_round - 1 - skipped_rounds) * scale.local_epochs


def _parallel(jobs: dict[str, list[str]], logs: Path, parallel: int = 2) -> dict[str, float]:
    """Run commands two at a time (one thread each on two cores); returns each one's wall seconds."""
    pending, running, seconds = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            running[name] = (spawn(cmd, logs / f"{name}.log"), time.monotonic())
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {logs / f'{name}.log'}")
                seconds[name] = time.monotonic() - started
                del running[name]
        time.sleep(1.0)
    return seconds


def run_alone(run: Run, scale: OwnersScale, data: OwnersData, key: Path, home: Path) -> dict:
    """Every owner trains alone on its shard, from scratch or from a model of the warm-up words."""
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    init, seconds = None, {}
    epochs, skipped = scale.epochs, 0
    if run.warmup:
        init, skipped = home / "warmup.npz", scale.warmup_rounds
        warmup_epochs = scale.warmup_rounds * scale.local_epochs
        cmd = _train_command(scale, data.warmup, init, key, warmup_epochs, None)
        seconds.update(_parallel({"warmup": cmd}, home))
        epochs -= warmup_epochs
    cosine = _cosine_from(scale, skipped)
    epochs, cosine = epochs * run.length, None if cosine is None else cosine * run.length
    jobs = {o.name: _train_command(scale, data.shards[o.name], home / f"{o.name}.npz", key, epochs, cosine,
                                   init) for o in OWNERS}  # fmt: skip
    seconds.update(_parallel(jobs, home))
    own = {o.name: score(home / f"{o.name}.npz", key, {o.name: data.tests[o.name]})[o.name] for o in OWNERS}
    return {"own": own, "seconds": seconds, "wall_s": time.monotonic() - started}


def _settings(run: Run, scale: OwnersScale, best: str) -> Settings:
    chosen = RUNS_BY_NAME[best] if run.best_optimizer else run
    edge_args: tuple[str, ...] = ()
    if run.personalize:
        edge_args = ("--personalize", *(["--own-model"] if run.own_models else []),
                     "--personal-epochs", str(run.personal_epochs), "--personal-lr", f"{run.personal_lr:g}")
    owners = run.data == "owners"
    mini_cosine = (scale.mini_cosine_from_round - 1) * run.length + 1 if scale.mini_cosine_from_round else 0
    if run.kind == "warmup":  # the warm-up rounds alone: FedAvg, no mu, nothing personal, the lr held
        if scale.cosine_from_round and scale.cosine_from_round <= scale.warmup_rounds:
            raise ValueError("the shared warm-up holds the lr: the cosine must start after it")
        full = _settings(replace(run, kind="federated"), scale, best)
        return replace(full, rounds=scale.warmup_rounds, lr_cosine_from_round=0)
    return Settings(
        rounds=scale.rounds if owners else scale.mini_rounds * run.length,
        local_epochs=scale.local_epochs if owners else scale.mini_local_epochs,
        preset=scale.preset, gamma=scale.gamma, lr=scale.lr, batch_size=scale.batch_size,
        optimizer=scale.optimizer,
        lr_cosine_from_round=scale.cosine_from_round if owners else mini_cosine,
        server_optimizer=chosen.server_optimizer,
        server_lr=chosen.server_lr, server_beta1=chosen.server_beta1, server_tau=chosen.server_tau,
        proximal_mu=(run.proximal_mu or scale.proximal_mu) if run.proximal else 0.0,
        warmup_rounds=scale.warmup_rounds if run.warmup else 0, warmup_words=scale.warmup_words,
        warmup_styles=scale.warmup_styles, warmup_labels=scale.warmup_labels,
        warmup_rehearsal=run.rehearsal, extra_edge_args=edge_args,
    )  # fmt: skip


def _owner_edges(data: OwnersData) -> dict[str, tuple[Path, Path]]:
    """Each owner's edge: its shard and its validation set (the edge's --val)."""
    return {o.name: (data.shards[o.name], data.vals[o.name]) for o in OWNERS}


def _federate(settings: Settings, edges: dict[str, tuple[Path, Path]], key: Path, pki: Path,
              home: Path) -> tuple[dict, float]:  # fmt: skip
    """Run (or go on with) the federation under ``home`` until its edges finish: its rounds, wall seconds."""
    started = time.monotonic()
    with LocalFederation(home, pki, key, settings) as fed:
        fed.start_aggregator(len(edges))
        for name, (shard, val) in edges.items():
            fed.start_edge(name, shard, val=val)
        fed.wait_edges(timeout_s=settings.rounds * settings.deadline_s)
        rounds = list_rounds(pki, fed.port)
    return rounds, time.monotonic() - started


def shared_warmup(scale: OwnersScale, data: OwnersData, key: Path, pki: Path,
                  work: Path) -> tuple[Path, dict]:  # fmt: skip
    """The federation of the warm-up rounds alone (FedAvg), run once under WORK/runs/warmup-federation.

    Every federation with warm-up starts from a copy of it: its aggregator, restarted with all the
    rounds, opens the first owners' round from the warm-up's final state (aggregator/coordinator.py,
    _extend) and the edges keep the warm-up words they rendered. Returns the directory and its rounds
    and wall seconds.
    """
    home = work / "runs" / WARMUP
    done = home / "done.json"
    if done.exists():
        return home, json.loads(done.read_text())
    shutil.rmtree(home, ignore_errors=True)
    edges = _owner_edges(data)
    rounds, wall = _federate(_settings(RUNS_BY_NAME[WARMUP], scale, ""), edges, key, pki, home)
    record = {"rounds": rounds, "wall_s": wall}
    done.write_text(json.dumps(record) + "\n")
    return home, record


def run_federated(run: Run, scale: OwnersScale, data: OwnersData, key: Path, pki: Path, home: Path,
                  best: str = SERVER_OPTIMIZER_RUNS[0]) -> dict:  # fmt: skip
    """One aggregator and an edge per owner (or per mini shard), real processes over mutual TLS.

    A run with warm-up goes on from the shared warm-up (shared_warmup): its wall time is that of the
    owners' rounds, and its rounds and bytes include the warm-up's.
    """
    if run.data == "owners":
        edges = _owner_edges(data)
        sets = dict(data.tests)
    else:
        edges = {f"mini-{k}": (s, data.mini_test) for k, s in enumerate(data.mini_shards[run.data])}
        sets = {"mini": data.mini_test}
    settings = _settings(run, scale, best)
    if run.kind == "warmup":  # run once, or found finished (then kept: the other runs went on from it)
        home, warmup = shared_warmup(scale, data, key, pki, home.parent.parent)
        rounds, wall = warmup["rounds"], warmup["wall_s"]
    else:
        shutil.rmtree(home, ignore_errors=True)
        if run.warmup:
            start, _ = shared_warmup(scale, data, key, pki, home.parent.parent)
            shutil.copytree(start, home, ignore=shutil.ignore_patterns("done.json"))
        rounds, wall = _federate(settings, edges, key, pki, home)
    first = next(iter(edges))
    generic = score(home / "edges" / first / "final.npz", key, sets)
    record = {
        "generic": generic,
        "wall_s": wall,
        "server_optimizer": settings.server_optimizer,
        "server_lr": settings.server_lr,
        "server_beta1": settings.server_beta1,
        "server_tau": settings.server_tau,
        "bytes_per_edge": _bytes_per_edge(rounds, len(edges)),
        "rounds": _round_evaluations(rounds),
    }
    if run.data == "owners":
        record["own"] = {name: generic[name] for name in edges}
    if run.personalize:
        edge_dir = home / "edges"
        record["personal"] = {name: score(edge_dir / name / "personal.npz", key, {name: sets[name]})[name]
                              for name in edges}  # fmt: skip
        own = {name: edge_dir / name / "own.npz" for name in edges}
        if all(path.exists() for path in own.values()):  # the edges' own models (Ditto), scored apart
            record["own_models"] = {name: score(path, key, {name: sets[name]})[name]
                                    for name, path in own.items()}  # fmt: skip
    return record


def _bytes_per_edge(rounds: dict, edges: int) -> dict[str, float]:
    """Bytes each edge sent and received over the whole run, from the aggregator's round records."""
    totals: dict[str, float] = {}
    for r in rounds.get("rounds", []):
        for name, value in r.get("bytes", {}).items():
            totals[name] = totals.get(name, 0.0) + int(value) / edges
    return totals


def _round_evaluations(rounds: dict) -> list[dict]:
    """Each round's federated evaluation as the aggregator keeps it: the edges' weighted mean word
    accuracy and loss of the new global model, and each edge's word accuracy (generic, personal)."""
    out = []
    for r in rounds.get("rounds", []):
        mean = r.get("evaluation") or {}
        if not int(mean.get("samples", 0)):
            continue
        edges = {e["edge_id"]: {k: e[k]["word_accuracy"] for k in ("generic", "personal")
                                if int((e.get(k) or {}).get("samples", 0))}
                 for e in r.get("evaluations", [])}  # fmt: skip
        out.append({"round": r["round_index"] + 1, "accuracy": mean.get("word_accuracy"),
                    "loss": mean.get("loss"), "edges": edges})  # fmt: skip
    return out


def _constants(record: dict) -> str:
    """The server optimizer's constants a run set, as " (lr 0.5, beta1 0.5)"; "" if it set none."""
    named = [f"{k} {record[f'server_{k}']:g}" for k in ("lr", "beta1", "tau") if record.get(f"server_{k}")]
    return f" ({', '.join(named)})" if named else ""


def _mb(record: dict) -> float:
    """Megabytes each edge sent and received on the wire over the run."""
    b = record.get("bytes_per_edge", {})
    return (b.get("wire_up", 0) + b.get("wire_down", 0)) / 1e6


# ---------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mean(scores: dict[str, dict]) -> float:
    return sum(s["accuracy"] for s in scores.values()) / len(scores)


def best_server_optimizer(results: dict[str, dict]) -> str:
    """The server-optimizer run whose generic model read most of the owners' sets (the first if none ran)."""
    means = {name: _mean(results[name]["generic"]) for name in SERVER_OPTIMIZER_RUNS if name in results}
    return max(means, key=means.get) if means else SERVER_OPTIMIZER_RUNS[0]


def _label(run: Run) -> str:
    return f"{run.label} (extra run)" if run.extra else run.label


def tables(results: dict[str, dict]) -> str:
    """The owners table (each run on each owner's held-out set) and the mini data table, as Markdown."""
    names = [o.name for o in OWNERS]
    lines = [
        "| run | " + " | ".join(names) + " | mean own | generic mean | wire MB per edge | wall |",
        "|---" * (len(names) + 5) + "|",
    ]
    ordered = sorted(RUNS, key=lambda run: run.extra)  # the scale's runs, then the extra runs
    for run in ordered:
        r = results.get(run.name)
        if r is None or run.data != "owners":
            continue
        mb = _mb(r)
        generic = _pct(_mean(r["generic"])) if "generic" in r else "-"
        cells = [_pct(r["own"][n]["accuracy"]) for n in names]
        lines.append(
            f"| {_label(run)} | " + " | ".join(cells) + f" | {_pct(_mean(r['own']))} | {generic} | "
            f"{mb:.1f} | {r['wall_s'] / 60:.1f} min |"
        )
        if "personal" in r:
            cells = [_pct(r["personal"][n]["accuracy"]) for n in names]
            lines.append(
                "| ... its personal models | " + " | ".join(cells) + f" | {_pct(_mean(r['personal']))} "
                "| - | - | - |"
            )
        if "own_models" in r:
            cells = [_pct(r["own_models"][n]["accuracy"]) for n in names]
            lines.append(
                "| ... its edges' own models (Ditto) | " + " | ".join(cells)
                + f" | {_pct(_mean(r['own_models']))} | - | - | - |"
            )
    lines += [
        "",
        "| run | server optimizer | mini test set | wire MB per edge | wall |",
        "|---|---|---|---|---|",
    ]
    for run in ordered:
        r = results.get(run.name)
        if r is not None and run.data != "owners":
            mb = _mb(r)
            lines.append(
                f"| {_label(run)} | {r['server_optimizer']}{_constants(r)}"
                + f" | {_pct(r['generic']['mini']['accuracy'])} | "
                f"{mb:.1f} | {r['wall_s'] / 60:.1f} min |"
            )
    return "\n".join(lines)


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every finished run's record, by run name."""
    return {
        p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.stem in RUN_NAMES
    }


# ---------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.owners", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="owners")
    p.add_argument("--runs", help=f"comma-separated runs (default: all but {', '.join(EXTRA_RUNS)}): "
                   f"{', '.join(RUN_NAMES)}")  # fmt: skip
    p.add_argument("--work", type=Path, help="data, PKI, key and run directories (default: runs/owners, or "
                   "runs/owners-smoke)")  # fmt: skip
    p.add_argument("--results", type=Path, help="one JSON per run (default: results/owners, or "
                   "results/owners-smoke)")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="print the tables from existing results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the missing runs, then print the tables; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scale = SCALES[args.scale]
    work = (args.work or Path("runs") / scale.name).resolve()
    results_dir = args.results or Path("results") / scale.name
    chosen = args.runs.split(",") if args.runs else [r.name for r in RUNS if not r.extra]
    unknown = [n for n in chosen if n not in RUN_NAMES]
    if unknown:
        print(f"owners: unknown runs {unknown}; choose from {', '.join(RUN_NAMES)}", file=sys.stderr)
        return 2
    if not args.report_only:
        stop_on_signals()
        torch.set_num_threads(2)
        data = make_data(work / "data", scale)
        names = [o.name for o in OWNERS] + [f"mini-{k}" for k in range(scale.mini_edges)]
        pki, key = make_pki(work / "pki", names), make_key(work)
        results_dir.mkdir(parents=True, exist_ok=True)
        for run in (r for r in RUNS if r.name in chosen):
            out = results_dir / f"{run.name}.json"
            if out.exists():
                continue
            log.info("run %s: %s", run.name, run.label)
            home = work / "runs" / run.name
            if run.kind == "alone":
                record = run_alone(run, scale, data, key, home)
            else:
                best = best_server_optimizer(load_results(results_dir))
                record = run_federated(run, scale, data, key, pki, home, best)
            record.update(run=asdict(run), scale=asdict(scale), date=time.strftime("%Y-%m-%d"))
            out.write_text(json.dumps(record, indent=2) + "\n")
            log.info("run %s done in %.0f s", run.name, record["wall_s"])
    print(tables(load_results(results_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
