"""`make demo`: a whole federation on this machine, as real processes over mutual TLS.

It renders synthetic word images, splits them into one IID shard per edge, makes a PKI and a
federation key, starts one aggregator and N edge agents on 127.0.0.1, waits for the rounds to
finish, then prints a table per round and the held-out accuracy of the federated model next to a
model trained on one shard alone for the same number of epochs. Every file stays in one working
directory; every process it started is stopped on success, failure or Ctrl-C.

    python deploy/demo.py [--work-dir runs/demo] [--edges 3] [--rounds 4] ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
OBSERVER = "ops"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def _run(cmd: Sequence[str], log: Path | None = None) -> str:
    """Run a command to completion; its output goes to ``log`` (if given) and is returned."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise DemoError(
            f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout


@dataclass(frozen=True)
class DataSpec:
    """What to render: training words split into shards, and a held-out test set of another seed."""

    train_words: int
    test_words: int
    styles: tuple[str, ...]
    seed: int = 7


def make_data(work: Path, edges: int, spec: DataSpec) -> tuple[list[Path], Path]:
    """Render the training set and a held-out test set, and split the training set into shards."""
    data = work / "data"
    styles = ",".join(spec.styles)
    train, test = data / "train", data / "test"
    if not (train / "data.mdb").exists():
        _run(
            [
                PY,
                "-m",
                "recognizer.cli",
                "synth",
                "--out",
                str(train),
                "--count",
                str(spec.train_words),
                "--seed",
                str(spec.seed),
                "--styles",
                styles,
            ]
        )
    if not (test / "data.mdb").exists():
        _run(
            [
                PY,
                "-m",
                "recognizer.cli",
                "synth",
                "--out",
                str(test),
                "--count",
                str(spec.test_words),
                "--seed",
                str(spec.seed + 1000),
                "--styles",
                styles,
            ]
        )
    shards = [data / "shards" / f"shard{k}" for k in range(edges)]
    if not all((s / "data.mdb").exists() for s in shards):
        out = _run(
            [
                PY,
                "-m",
                "recognizer.cli",
                "shard",
                "--input",
                str(train),
                "--parts",
                str(edges),
                "--out",
                str(data / "shards"),
                "--seed",
                str(spec.seed),
            ]
        )
        shards = [Path(line) for line in out.split()]
    return shards, test


def make_pki(work: Path, edges: int) -> Path:
    """A CA, the aggregator's certificate for 127.0.0.1, one certificate per edge and an observer."""
    pki = work / "pki"
    pki_cmd = [PY, "-m", "fedocr.pki"]
    if not (pki / "ca.pem").exists():
        _run([*pki_cmd, "init", "--dir", str(pki)])
    wanted = [("server", "aggregator", ["--host", "127.0.0.1", "--host", "localhost"])]
    wanted += [("edge", f"edge-{k}", []) for k in range(edges)]
    wanted += [("observer", OBSERVER, [])]
    for role, name, extra in wanted:
        if not (pki / f"{name}.pem").exists():
            _run([*pki_cmd, role, "--name", name, "--dir", str(pki), *extra])
    return pki


def make_key(work: Path) -> Path:
    """The federation key that only the edges read."""
    key = work / "federation.key"
    if not key.exists():
        _run([PY, "-m", "edge_agent.cli", "keygen", "--out", str(key)])
    return key


@dataclass
class Settings:
    """The federation's settings: the aggregator's round plan and the edges' model."""

    rounds: int
    local_epochs: int
    preset: str
    gamma: str
    lr: float = 1.0
    batch_size: int = 32
    quorum: int | None = None  # default: every edge
    min_edges: int = 1
    deadline_s: float = 900.0
    threads: int = 1
    lr_decay_rounds: str = ""  # 1-based rounds, "5,30"; the lr is x0.1, x0.01 ... from each on
    optimizer: str = "adadelta"
    extra_edge_args: tuple[str, ...] = ()


@dataclass
class Federation:
    """One aggregator and N edge agents as child processes; ``stop()`` ends them all."""

    work: Path
    pki: Path
    key: Path
    settings: Settings
    aggregator: subprocess.Popen | None = None
    port: int = 0
    edges: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _spawn(self, cmd: Sequence[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            list(cmd), stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def start_aggregator(self, n_edges: int, port: int = 0) -> int:
        """Start the aggregator on 127.0.0.1:``port`` (0: an ephemeral port); returns the port.

        A restart with the same state directory resumes the federation where it stood.
        """
        s = self.settings
        pki = self.pki
        cmd = [
            PY,
            "-m",
            "aggregator.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(self.work / "aggregator" / "state"),
            "--cert",
            str(pki / "aggregator.pem"),
            "--key",
            str(pki / "aggregator.key"),
            "--ca",
            str(pki / "ca.pem"),
            "--rounds",
            str(s.rounds),
            "--quorum",
            str(s.quorum or n_edges),
            "--min-edges",
            str(s.min_edges),
            "--deadline",
            str(s.deadline_s),
            "--local-epochs",
            str(s.local_epochs),
            "--lr",
            str(s.lr),
            "--batch-size",
            str(s.batch_size),
            "--lr-decay-rounds",
            s.lr_decay_rounds,
            "--lr-decay-factors",
            ",".join(f"{0.1 ** (i + 1):g}" for i, _ in enumerate(filter(None, s.lr_decay_rounds.split(",")))),
        ]
        log = self.work / "aggregator" / "aggregator.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.aggregator = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.aggregator.stdout.readline()
        if "listening on port" not in line:
            raise DemoError(f"the aggregator did not start; see {log}")
        self.port = int(line.rsplit(" ", 1)[1])
        return self.port

    def start_edge(self, name: str, shard: Path, val: Path | None = None) -> subprocess.Popen:
        """Start edge ``name`` on ``shard``; its log and work directory are under work/edges/name."""
        s = self.settings
        home = self.work / "edges" / name
        cmd = [
            PY,
            "-m",
            "edge_agent.cli",
            "--shard",
            str(shard),
            "--server",
            f"127.0.0.1:{self.port}",
            "--key",
            str(self.key),
            "--cert",
            str(self.pki / f"{name}.pem"),
            "--cert-key",
            str(self.pki / f"{name}.key"),
            "--ca",
            str(self.pki / "ca.pem"),
            "--preset",
            s.preset,
            "--gamma",
            s.gamma,
            "--threads",
            str(s.threads),
            "--work-dir",
            str(home),
            "--optimizer",
            s.optimizer,
            *s.extra_edge_args,
        ]
        if val is not None:
            cmd += ["--val", str(val)]
        self.edges[name] = self._spawn(cmd, home / "edge.log")
        return self.edges[name]

    def wait_edges(self, timeout_s: float) -> None:
        """Wait for every edge to exit; raise DemoError if one fails or the time runs out."""
        deadline = time.monotonic() + timeout_s
        for name, proc in self.edges.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise DemoError(f"edge {name} still running after {timeout_s:.0f} s") from exc
            if code != 0:
                log = self.work / "edges" / name / "edge.log"
                raise DemoError(f"edge {name} exited with {code}; see {log}")

    def stop(self) -> None:
        """Stop every process this federation started (SIGTERM, then SIGKILL)."""
        procs = [p for p in [self.aggregator, *self.edges.values()] if p is not None]
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        if self.aggregator is not None and self.aggregator.stdout is not None:
            self.aggregator.stdout.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def list_rounds(pki: Path, port: int) -> dict:
    """ListRounds as an observer, as JSON (what `grpcurl ... ListRounds` shows)."""
    from google.protobuf import json_format

    from fedocr import tls
    from fedocr.v1 import federation_pb2 as pb
    from fedocr.v1 import federation_pb2_grpc as pb_grpc

    channel = tls.secure_channel(
        f"127.0.0.1:{port}", pki / "ca.pem", pki / f"{OBSERVER}.pem", pki / f"{OBSERVER}.key"
    )
    try:
        reply = pb_grpc.FederationStub(channel).ListRounds(pb.ListRoundsRequest(), timeout=30)
    finally:
        channel.close()
    return json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def evaluate(model: Path, key: Path, data: Path, threads: int = 2) -> dict:
    """`recognizer eval --json` of a model file on an LMDB."""
    out = _run(
        [
            PY,
            "-m",
            "recognizer.cli",
            "eval",
            "--model",
            str(model),
            "--key",
            str(key),
            "--data",
            str(data),
            "--beam",
            "1",
            "--threads",
            str(threads),
            "--json",
        ]
    )
    return json.loads(out.strip().splitlines()[-1])


def scores_by_version(journal: Path) -> dict[int, dict]:
    """Held-out scores of the global model by state version, from an edge journal (``--val``)."""
    scores = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            if record.get("val"):
                scores[int(record["state_version"])] = record["val"]
    return scores


def round_table(rounds: dict, scores: dict[int, dict] | None = None) -> str:
    """A table per round: edges counted, bytes up and down (wire and raw), duration, and the held-out
    score of the global model the round produced (from ``scores_by_version``), when known."""
    scores = scores or {}
    mb = lambda n: f"{int(n) / 1e6:.2f}"  # noqa: E731
    head = (
        "round",
        "state",
        "edges",
        "up wire MB",
        "up raw MB",
        "down wire MB",
        "down raw MB",
        "seconds",
        "acc %",
        "1-NED",
        "loss",
    )
    rows = []
    for r in rounds.get("rounds", []):
        b = r["bytes"]
        uploaded = sum(1 for e in r.get("edges", []) if e.get("uploaded"))
        after = scores.get(int(r.get("state_version", 0)) + 1, {})
        rows.append(
            (
                str(r["round_index"] + 1),
                r["state"].removeprefix("ROUND_STATE_"),
                str(uploaded),
                mb(b["wire_up"]),
                mb(b["raw_up"]),
                mb(b["wire_down"]),
                mb(b["raw_down"]),
                f"{r['duration_seconds']:.1f}",
                f"{100 * after['accuracy']:.1f}" if after else "-",
                f"{after['char_accuracy']:.3f}" if after else "-",
                f"{after['loss']:.3f}" if after else "-",
            )
        )
    t = rounds.get("total_bytes", {})
    rows.append(
        (
            "total",
            "",
            "",
            mb(t.get("wire_up", 0)),
            mb(t.get("raw_up", 0)),
            mb(t.get("wire_down", 0)),
            mb(t.get("raw_down", 0)),
            "",
            "",
            "",
            "",
        )
    )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows])


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--preset", default="fedocr-tiny")
    p.add_argument("--gamma", default="1/2")
    p.add_argument("--optimizer", default="adadelta", choices=("adadelta", "adam"))
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-words", type=int, default=24000)
    p.add_argument("--test-words", type=int, default=600)
    p.add_argument("--styles", default="clean")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the federation may take")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)  # even when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGTERM, _interrupt)
    work: Path = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"demo: working directory {work}", flush=True)
    settings = Settings(
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        preset=args.preset,
        gamma=args.gamma,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
    )
    fed: Federation | None = None
    try:
        shards, test = make_data(
            work, args.edges, DataSpec(args.train_words, args.test_words, tuple(args.styles.split(",")))
        )
        pki, key = make_pki(work, args.edges), make_key(work)
        print(f"demo: data, PKI and key ready ({time.perf_counter() - started:.0f} s)", flush=True)
        # A fresh aggregator state per run: a finished federation would not train again.
        state = work / "aggregator" / "state"
        for f in state.glob("*"):
            f.unlink()
        fed = Federation(work, pki, key, settings)
        port = fed.start_aggregator(args.edges)
        print(f"demo: aggregator on 127.0.0.1:{port}; {args.edges} edges, {args.rounds} rounds", flush=True)
        for k, shard in enumerate(shards):  # edge-0 also scores each global model on the test set
            fed.start_edge(f"edge-{k}", shard, val=test if k == 0 else None)
        fed_started = time.perf_counter()
        fed.wait_edges(args.timeout)
        fed_seconds = time.perf_counter() - fed_started
        rounds = list_rounds(pki, port)
        fed.stop()
        scores = scores_by_version(work / "edges" / "edge-0" / "rounds.jsonl")
        print(round_table(rounds, scores), flush=True)
        single_model = work / "single" / "model.npz"
        single_started = time.perf_counter()
        _run(
            [
                PY,
                "-m",
                "recognizer.cli",
                "train",
                "--data",
                str(shards[0]),
                "--preset",
                args.preset,
                "--gamma",
                args.gamma,
                "--epochs",
                str(args.rounds * args.local_epochs),
                "--out",
                str(single_model),
                "--key",
                str(key),
                "--batch-size",
                str(args.batch_size),
                "--optimizer",
                args.optimizer,
                "--lr",
                str(args.lr),
                "--threads",
                "2",
            ],
            log=work / "single" / "train.log",
        )
        single_seconds = time.perf_counter() - single_started
        federated = evaluate(work / "edges" / "edge-0" / "final.npz", key, test)
        single = evaluate(single_model, key, test)
        print(f"\nheld-out test set: {federated['samples']} words ({args.styles})")
        for name, result, seconds in (
            (
                f"federated, {args.edges} edges x {args.rounds} rounds x {args.local_epochs} epoch",
                federated,
                fed_seconds,
            ),
            (f"single edge, shard 0 x {args.rounds * args.local_epochs} epochs", single, single_seconds),
        ):
            print(
                f"  {name:<44} accuracy {100 * result['accuracy']:5.1f}%  "
                f"1-NED {result['char_accuracy']:.3f}  "
                f"loss {result['loss']:.3f}  ({seconds:.0f} s)"
            )
        summary = {
            "federated": federated,
            "single": single,
            "rounds": rounds,
            "seconds": {
                "total": time.perf_counter() - started,
                "federation": fed_seconds,
                "single": single_seconds,
            },
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\ndemo: done in {time.perf_counter() - started:.0f} s; files in {work}")
        return 0
    except DemoError as exc:
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
