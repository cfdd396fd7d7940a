"""`make demo`: a whole federation on this machine, as real processes over mutual TLS.

The story, in the order main() tells it:

1. data: synthetic word images, split into one IID shard per edge, and a held-out test set
   rendered with another seed;
2. a PKI (CA, aggregator, one certificate per edge, an observer) and the federation key;
3. the federation: one aggregator and N edge agents on 127.0.0.1, with live progress (rounds
   opening, epochs and losses, uploads, the global model's held-out accuracy as each round
   closes), and beside it a model trained on shard 0 alone for the same number of epochs;
4. a table per round, then both models' held-out accuracy.

Every file stays in one working directory (summary.json holds the results); every process it
started is stopped on success, failure, Ctrl-C or SIGTERM. The processes are started by
fedocr.harness; the live progress and the table are printed by experiments/demo_progress.py.

    python -m experiments.demo [--work-dir runs/demo] [--edges 3] [--rounds 12] ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.demo_progress import Watcher, round_table
from fedocr.harness import (
    PY,
    HarnessError,
    LocalFederation,
    Settings,
    list_rounds,
    make_key,
    make_pki,
    run_command,
    scores_by_version,
    stop_on_signals,
)

POLL_S = 2.0  # how often the live progress looks for news


@dataclass(frozen=True)
class DataSpec:
    """What to render: training words split into shards, and a held-out test set of another seed."""

    train_words: int
    test_words: int
    styles: str  # comma-separated style families
    labels: str = "mixed"  # recognizer.synth.LABEL_KINDS
    seed: int = 7


def make_data(work: Path, edges: int, spec: DataSpec) -> tuple[list[Path], Path]:
    """Render the training set and the test set and split the training set into shards; returns
    (shards, test set). Data rendered before for the same spec and edge count is reused."""
    data = work / "data"
    shards = [data / "shards" / f"shard{k}" for k in range(edges)]
    made = json.dumps({**asdict(spec), "edges": edges})
    if (data / "spec.json").exists() and (data / "spec.json").read_text() == made:
        return shards, data / "test"
    shutil.rmtree(data, ignore_errors=True)
    cli = [PY, "-m", "recognizer.cli"]
    sets = {"train": (spec.train_words, spec.seed), "test": (spec.test_words, spec.seed + 1000)}
    for name, (count, seed) in sets.items():
        run_command([*cli, "synth", "--out", str(data / name), "--count", str(count), "--seed", str(seed),
                     "--styles", spec.styles, "--labels", spec.labels])  # fmt: skip
    run_command([*cli, "shard", "--input", str(data / "train"), "--parts", str(edges),
                 "--out", str(data / "shards"), "--seed", str(spec.seed)])  # fmt: skip
    (data / "spec.json").write_text(made)
    return shards, data / "test"


def single_edge_command(args: argparse.Namespace, shard: Path, key: Path, out: Path) -> list[str]:
    """`recognizer train` on one shard for rounds x local epochs, with the edges' model and recipe."""
    cmd = [
        PY, "-m", "recognizer.cli", "train", "--data", str(shard), "--out", str(out), "--key", str(key),
        "--preset", args.preset, "--gamma", args.gamma, "--epochs", str(args.rounds * args.local_epochs),
        "--batch-size", str(args.batch_size), "--optimizer", args.optimizer, "--lr", str(args.lr),
        "--threads", "1",
    ]  # fmt: skip
    if args.cosine_from_round:  # the federation's schedule, in epochs
        cmd += ["--cosine-from", str((args.cosine_from_round - 1) * args.local_epochs)]
    return cmd + (["--alphabet", args.alphabet] if args.alphabet else [])


def federate(
    fed: LocalFederation, shards: list[Path], test: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Run the federation to its end, printing its progress, with the single-edge training beside it;
    returns the seconds each took."""
    for old in (fed.work / "aggregator" / "state", fed.work / "edges", fed.work / "single"):
        shutil.rmtree(old, ignore_errors=True)  # a fresh federation: a finished one would not train again
    port = fed.start_aggregator(len(shards))
    print(f"demo: aggregator on 127.0.0.1:{port}; {len(shards)} edges, {args.rounds} rounds", flush=True)
    for k, shard in enumerate(shards):  # edge-0 also scores each global model on the test set
        fed.start_edge(f"edge-{k}", shard, val=test if k == 0 else None)
    home = fed.work / "single"
    watch = Watcher(fed, home / "train.log")
    started, seconds = time.monotonic(), {}
    single: subprocess.Popen | None = None
    while True:
        edges_done = fed.edges_done()
        watch.poll()  # after edges_done, so that the last lines of finished edges are printed too
        now = time.monotonic()
        if edges_done and "federation" not in seconds:
            seconds["federation"] = now - started
            print(f"demo: federation finished in {seconds['federation']:.0f} s", flush=True)
        if single is None and (watch.started or edges_done):
            # Only once an edge has joined a round: a setting that every edge refuses is theirs to report.
            cmd = single_edge_command(args, shards[0], fed.key, home / "model.npz")
            single, single_started = fed.start_helper("single", cmd, home / "train.log"), now
            epochs = args.rounds * args.local_epochs
            print(f"demo: single-edge training started (shard 0, {epochs} epochs, 1 thread)", flush=True)
        elif single is not None and "single" not in seconds and single.poll() is not None:
            if single.returncode != 0:
                log = home / "train.log"
                raise HarnessError(f"the single-edge training exited with {single.returncode}; see {log}")
            seconds["single"] = now - single_started
            print(f"demo: single-edge training finished in {seconds['single']:.0f} s", flush=True)
        if len(seconds) == 2:
            return seconds
        if now - started > args.timeout:
            raise HarnessError(f"still running after {args.timeout:.0f} s; see the logs under {fed.work}")
        time.sleep(POLL_S)


def evaluate(model: Path, key: Path, data: Path, threads: int = 2) -> dict:
    """`recognizer eval --json` of a model file on an LMDB."""
    out = run_command([PY, "-m", "recognizer.cli", "eval", "--model", str(model), "--key", str(key),
                       "--data", str(data), "--beam", "1", "--threads", str(threads), "--json"])  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def print_results(args: argparse.Namespace, federated: dict, single: dict, seconds: dict[str, float]) -> None:
    """Both models' held-out scores, one line each."""
    print(f"\nheld-out test set: {federated['samples']} words ({args.styles}, {args.labels})")
    federation = f"federated, {args.edges} edges x {args.rounds} rounds x {args.local_epochs} epochs"
    rows = (
        (federation, federated, "federation"),
        (f"single edge, shard 0 x {args.rounds * args.local_epochs} epochs", single, "single"),
    )
    for name, result, took in rows:
        print(
            f"  {name:<44} accuracy {100 * result['accuracy']:5.1f}%  1-NED {result['char_accuracy']:.3f}  "
            f"loss {result['loss']:.3f}  ({seconds[took]:.0f} s)"
        )


def _parser() -> argparse.ArgumentParser:
    from fedocr import encodings
    from recognizer.charset import ALPHABETS
    from recognizer.recipe import DEFAULT_BATCH_SIZE, DEFAULT_OPTIMIZER, OPTIMIZERS
    from recognizer.synth import LABEL_KINDS

    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--preset", default="fedocr-tiny")
    p.add_argument("--gamma", default="1/2")
    p.add_argument("--alphabet", choices=sorted(ALPHABETS), help="default: the preset's")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="default: the optimizer's (recognizer.recipe.DEFAULT_LR)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--cosine-from-round", type=int, default=0,
                   help="hold the lr until this round, then a cosine to 1%% at the last (default 0: "
                        "a constant lr)")
    p.add_argument("--encoding", default="float32", choices=tuple(encodings.NAMES),
                   help="how edges encode their uploads (with error feedback)")
    p.add_argument("--download-encoding", default="float32", choices=tuple(encodings.NAMES),
                   help="how edges download the state: float32 whole, or each round's change (error "
                        "feedback on the aggregator)")
    # Small shards, as in real federations: one owner alone has too little to generalize from.
    p.add_argument("--secure-aggregation", action="store_true", help="masked uploads (docs/aggregator.md)")
    p.add_argument("--secure-code-bits", type=int, default=0, help="with it: uploads as b-bit codes, 2..8")
    p.add_argument("--train-words", type=int, default=2400, help="split evenly among the edges")
    p.add_argument("--test-words", type=int, default=300)
    p.add_argument("--styles", default="clean")
    # Digit strings: with no language model to lean on, the model must read to score, and they
    # take the recognizer off its initial plateau earliest on two CPU cores.
    p.add_argument("--labels", default="digits", choices=list(LABEL_KINDS), help="what the words are")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the federation may take")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.lr is None:
        from recognizer.recipe import DEFAULT_LR

        args.lr = DEFAULT_LR[args.optimizer]
    stop_on_signals()  # Ctrl-C and SIGTERM unwind through `finally`, which stops every process
    work: Path = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"demo: working directory {work}", flush=True)
    fed: LocalFederation | None = None
    try:
        spec = DataSpec(args.train_words, args.test_words, args.styles, args.labels)
        shards, test = make_data(work, args.edges, spec)
        pki, key = make_pki(work / "pki", args.edges), make_key(work)
        print(f"demo: data, PKI and key ready ({time.monotonic() - started:.0f} s)", flush=True)

        settings = Settings(
            rounds=args.rounds, local_epochs=args.local_epochs, preset=args.preset, gamma=args.gamma,
            lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, encoding=args.encoding,
            download_encoding=args.download_encoding, lr_cosine_from_round=args.cosine_from_round,
            extra_edge_args=("--alphabet", args.alphabet) if args.alphabet else (),
            secure_aggregation=args.secure_aggregation, secure_code_bits=args.secure_code_bits,
        )  # fmt: skip
        fed = LocalFederation(work, pki, key, settings)
        seconds = federate(fed, shards, test, args)
        rounds = list_rounds(pki, fed.port)
        fed.stop()

        scores = scores_by_version(work / "edges" / "edge-0" / "rounds.jsonl")
        print(f"\n{round_table(rounds, scores)}", flush=True)
        federated = evaluate(work / "edges" / "edge-0" / "final.npz", key, test)
        single = evaluate(work / "single" / "model.npz", key, test)
        print_results(args, federated, single, seconds)
        seconds["total"] = time.monotonic() - started
        summary = {"args": vars(args), "federated": federated, "single": single, "rounds": rounds}
        (work / "summary.json").write_text(json.dumps({**summary, "seconds": seconds}, indent=2, default=str))
        print(f"\ndemo: done in {seconds['total']:.0f} s; files in {work}")
        return 0
    except HarnessError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; processes stopped", file=sys.stderr)
        return 130
    finally:
        if fed is not None:
            fed.stop()


if __name__ == "__main__":
    sys.exit(main())
