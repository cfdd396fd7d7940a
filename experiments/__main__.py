"""`python -m experiments --scale smoke|mini|paper`: every model in every manner, then the report.

Resumable: a run whose result file exists is skipped, so an interrupted experiment goes on where
it stopped (`make experiment` again). Data, PKI and key are made once under the work directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from experiments.data import make_data
from experiments.report.document import write_report
from experiments.runs import (
    Context,
    RunError,
    adopt_pretrained,
    finish_training,
    machine,
    pretrain_all,
    record_finished_training,
    result_path,
    run_federated,
    start_training,
)
from experiments.scales import MANNERS, MODELS, SCALES, ModelSpec, Scale, model_by_id, preset_of
from fedocr import encodings, harness
from recognizer.model import model_info

log = logging.getLogger("experiments")
DISCUSSION = Path(__file__).with_name("discussion")  # discussion/<scale>.md: prose for docs/results
RESULTS_DOCS = Path("docs") / "results"  # each scale's report and Fig. 3
REPORTED = "mini-pre"  # the default scale, the one the README reports (docs/results/experiment-mini-pre.md)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default=REPORTED)
    p.add_argument("--work", type=Path, help="data, PKI, key and run logs (default: runs/experiment-SCALE)")
    p.add_argument("--results", type=Path, help="one JSON per run (default: results/SCALE)")
    p.add_argument("--docs", type=Path, help=f"the report (default: {RESULTS_DOCS}/experiment-SCALE.md)")
    p.add_argument("--fig", type=Path, help=f"Fig. 3 PNG (default: {RESULTS_DOCS}/fig3-SCALE.png)")
    p.add_argument("--pretrained-work", type=Path, help="the work directory of the scale this one takes its "
                   "key and pretrained models from (default: runs/experiment-SOURCE)")  # fmt: skip
    p.add_argument("--models", help="comma-separated model ids (default: all)")
    p.add_argument("--manners", help="comma-separated manners (default: single,centralized,federated)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from existing results")
    p.add_argument("--encoding", default="float32", choices=tuple(encodings.NAMES),
                   help="how the federated runs' edges encode their uploads (with error feedback); "
                        "pass another --results for anything but float32")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def default_work(scale: str) -> Path:
    """A scale's work directory unless --work says otherwise: data, PKI, key and run logs."""
    return Path("runs") / f"experiment-{scale}"


def default_results(scale: str) -> Path:
    """A scale's results directory unless --results says otherwise: one JSON per run."""
    return Path("results") / scale


def paper_size() -> dict[str, dict]:
    """Sizes of the paper-size presets at every model's gamma (counted, not trained)."""
    sizes = {}
    for model in MODELS:
        preset = SCALES["paper"].presets[model.family]
        info = model_info(preset, model.gamma_value)
        sizes[model.id] = {"preset": preset, "gamma": model.gamma, "real_params": info["real_params"],
                           "state_bytes": info["state_bytes"]}  # fmt: skip
    return sizes


def settings(s: Scale) -> dict:
    """What decides a run's result: the data, the recipe and the presets (meta.json holds them)."""
    return {
        "data": {"train_words": s.train_words, "test_words_per_set": s.test_words, "styles": "all 8 families",
                 "edges": s.edges, "split": "iid", "seed": s.seed},
        "rounds": s.rounds, "local_epochs": s.local_epochs, "epochs": s.epochs, "batch_size": s.batch_size,
        "labels": s.labels, "optimizer": s.optimizer, "lr": s.lr, "lr_decay_rounds": list(s.decay_rounds),
        "lr_decay_factors": list(s.decay_factors), "lr_decay_epochs": list(s.decay_epochs),
        **({"lr_cosine_from_round": s.cosine_from_round, "lr_cosine_from_epoch": s.cosine_from_epoch}
           if s.cosine_from_round else {}),
        **({"pretrain": s.pretraining} if s.pretraining else {}),
        **({"pretrained_from": s.pretrained_from} if s.pretrained_from else {}),
        "presets": dict(s.presets), "beam": s.beam,
    }  # fmt: skip


def check_results_match(results: Path, scale: Scale, encoding: str = "float32") -> None:
    """Raise ValueError when ``results`` holds runs made with other settings than ``scale``'s.

    A rerun goes on from the finished runs, so mixing settings would report runs that are not
    comparable; the caller moves the old results away instead.
    """
    path = results / "meta.json"
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    differ = [k for k, v in settings(scale).items() if recorded.get(k) != v]
    if recorded.get("encoding", "float32") != encoding:  # results made before uploads had one: float32
        differ.append("encoding")
    differ.sort()
    if differ:
        raise ValueError(
            f"{results} holds runs made with other settings ({', '.join(differ)} differ from scale "
            f"{scale.name}'s): move them away, or pass another --results and --work"
        )


def write_meta(ctx: Context, started: float) -> None:
    """The setup every run shares, for the report (updated after each run with the wall time)."""
    s: Scale = ctx.scale
    path = ctx.results / "meta.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    meta = {
        "scale": s.name, "machine": machine(), **settings(s), "encoding": ctx.encoding,
        "threads_per_process": s.threads,
        "wall_s": round(previous.get("wall_s", 0.0) + time.monotonic() - started, 1),
        "paper_size": previous.get("paper_size") or paper_size(),
    }  # fmt: skip
    ctx.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1) + "\n")


def run_all(ctx: Context, models: list, manners: list[str]) -> None:
    """Every missing run. A model's single and centralized trainings (one thread each) start beside
    its federation and may go on beside the next model's, so the machine stays busy."""
    running: list[tuple[ModelSpec, str, subprocess.Popen, float]] = []
    if ctx.data.pretrain is not None:
        pretrain_all(ctx, models)
    try:
        for model in models:
            missing = [m for m in manners if not result_path(ctx, model, m).exists()]
            for manner in [m for m in ("centralized", "single") if m in missing]:
                if record_finished_training(ctx, model, manner) is not None:
                    continue
                log.info("training %s: %s (%s)", model.id, manner, preset_of(ctx.scale, model))
                running.append((model, manner, start_training(ctx, model, manner), time.time()))
            if "federated" in missing:
                log.info("federated %s: %d edges, %d rounds", model.id, ctx.scale.edges, ctx.scale.rounds)
                run_federated(ctx, model)
            running = _reap(ctx, running, wait=False)
        _reap(ctx, running, wait=True)
    finally:
        harness.stop_many([proc for *_, proc, _ in running])


def _reap(ctx: Context, running: list, wait: bool) -> list:
    """Evaluate and record the trainings that ended (all of them with ``wait``); returns the rest."""
    left = []
    for model, manner, proc, started in running:
        if wait or proc.poll() is not None:
            finish_training(ctx, model, manner, proc, started)
        else:
            left.append((model, manner, proc, started))
    return left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    scale = SCALES[args.scale]
    work = args.work or default_work(scale.name)
    results = args.results or default_results(scale.name)
    docs = args.docs or RESULTS_DOCS / f"experiment-{scale.name}.md"
    fig = args.fig or RESULTS_DOCS / f"fig3-{scale.name}.png"
    try:
        models = [model_by_id(m) for m in args.models.split(",")] if args.models else list(MODELS)
        manners = args.manners.split(",") if args.manners else list(MANNERS)
        if unknown := [m for m in manners if m not in MANNERS]:
            raise ValueError(f"unknown manners {unknown}; choose from {', '.join(MANNERS)}")
        if args.pretrained_work and not scale.pretrained_from:
            raise ValueError(f"--pretrained-work: scale {scale.name} starts from no other scale's models")
        if not args.report_only:
            check_results_match(results, scale, args.encoding)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    harness.stop_on_signals()  # SIGTERM unwinds like Ctrl-C: the children are stopped, finished runs kept
    if not args.report_only:
        started = time.monotonic()
        work.mkdir(parents=True, exist_ok=True)
        try:
            if scale.pretrained_from:  # results/SOURCE's scores go with the default work directory only
                source = args.pretrained_work or default_work(scale.pretrained_from)
                scores = None if args.pretrained_work else default_results(scale.pretrained_from)
                adopt_pretrained(source, scores, work, results, models)
            log.info("scale %s: rendering data under %s", scale.name, work / "data")
            data = make_data(work / "data", scale)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        pki = harness.make_pki(work / "pki", scale.edges)
        ctx = Context(scale, data, harness.make_key(work), pki, work, results, args.encoding)
        try:
            run_all(ctx, models, manners)
        except (RunError, harness.HarnessError) as exc:  # a training or a federation process failed
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; finished runs are kept and a rerun goes on from there", file=sys.stderr)
            return 130
        finally:
            write_meta(ctx, started)
    discussion = DISCUSSION / f"{scale.name}.md"
    preamble = discussion.read_text() if discussion.exists() else ""
    write_report(results, docs, fig, preamble)
    print(f"wrote {docs} and {fig} from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
