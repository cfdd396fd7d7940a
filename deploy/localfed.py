"""A federation on this machine: PKI, key, and the aggregator and edge agents as child processes.

`make demo` (deploy/demo.py), `make experiment` (experiments/runs.py) and the end-to-end tests start
federations with this module. Every file a federation writes stays under its working directory:

    WORK/aggregator/aggregator.log, WORK/aggregator/state/
    WORK/edges/NAME/edge.log, WORK/edges/NAME/rounds.jsonl (the edge's journal), .../final.npz
"""

from __future__ import annotations

import contextlib
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
OBSERVER = "ops"  # the certificate ListRounds is asked with
FAILURE_GRACE_S = 5.0  # how long edges_done waits, after one edge failed, for the others to fail too


class DemoError(RuntimeError):
    """A step or a process failed; the message says which and where its log is."""


def run_command(cmd: Sequence[str], log: Path | None = None) -> str:
    """Run a command to completion; its output goes to ``log`` (if given) and is returned.

    Raises:
        DemoError: the command exited with a non-zero status (the message ends with its stderr).
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise DemoError(
            f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout


def make_pki(work: Path, edges: int) -> Path:
    """A CA, the aggregator's certificate for 127.0.0.1, one certificate per edge and an observer."""
    pki = work / "pki"
    pki_cmd = [PY, "-m", "fedocr.pki"]
    if not (pki / "ca.pem").exists():
        run_command([*pki_cmd, "init", "--dir", str(pki)])
    wanted = [("server", "aggregator", ["--host", "127.0.0.1", "--host", "localhost"])]
    wanted += [("edge", f"edge-{k}", []) for k in range(edges)]
    wanted += [("observer", OBSERVER, [])]
    for role, name, extra in wanted:
        if not (pki / f"{name}.pem").exists():
            run_command([*pki_cmd, role, "--name", name, "--dir", str(pki), *extra])
    return pki


KEY_FILE = "federation.key"  # the federation key's name in a work directory


def make_key(work: Path) -> Path:
    """The federation key that only the edges read."""
    key = work / KEY_FILE
    if not key.exists():
        run_command([PY, "-m", "edge_agent.cli", "keygen", "--out", str(key)])
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
    lr_cosine_from_round: int = 0  # 1-based round from which the lr falls along a cosine (0: off)
    optimizer: str = "adadelta"  # in the aggregator's plan, which the edges follow
    encoding: str = "float32"  # the uploads' encoding (fedocr.encodings), in the plan too
    extra_edge_args: tuple[str, ...] = ()
    secure_aggregation: bool = False  # masked uploads; the server learns only each round's sum


@dataclass
class Federation:
    """One aggregator, N edge agents and any helper processes as children; ``stop()`` ends them all."""

    work: Path
    pki: Path
    key: Path
    settings: Settings
    aggregator: subprocess.Popen | None = None
    port: int = 0
    edges: dict[str, subprocess.Popen] = field(default_factory=dict)
    helpers: dict[str, subprocess.Popen] = field(default_factory=dict)

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
        decays = [r for r in s.lr_decay_rounds.split(",") if r]
        cmd = [
            PY, "-m", "aggregator.cli", "serve",
            "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(self.work / "aggregator" / "state"),
            "--cert", str(pki / "aggregator.pem"),
            "--key", str(pki / "aggregator.key"),
            "--ca", str(pki / "ca.pem"),
            "--rounds", str(s.rounds),
            "--quorum", str(s.quorum or n_edges),
            "--min-edges", str(s.min_edges),
            "--deadline", str(s.deadline_s),
            "--local-epochs", str(s.local_epochs),
            "--lr", str(s.lr),
            "--batch-size", str(s.batch_size),
            "--optimizer", s.optimizer,
            "--encoding", s.encoding,
            "--lr-decay-rounds", s.lr_decay_rounds,
            "--lr-decay-factors", ",".join(f"{0.1 ** (i + 1):g}" for i in range(len(decays))),
            "--lr-cosine-from-round", str(s.lr_cosine_from_round),
            *(["--secure-aggregation"] if s.secure_aggregation else []),
        ]  # fmt: skip
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
            PY, "-m", "edge_agent.cli",
            "--shard", str(shard),
            "--server", f"127.0.0.1:{self.port}",
            "--key", str(self.key),
            "--cert", str(self.pki / f"{name}.pem"),
            "--cert-key", str(self.pki / f"{name}.key"),
            "--ca", str(self.pki / "ca.pem"),
            "--preset", s.preset,
            "--gamma", s.gamma,
            "--threads", str(s.threads),
            "--work-dir", str(home),
            "--optimizer", s.optimizer,
            *s.extra_edge_args,
        ]  # fmt: skip
        if val is not None:
            cmd += ["--val", str(val)]
        self.edges[name] = self._spawn(cmd, home / "edge.log")
        return self.edges[name]

    def start_helper(self, name: str, cmd: Sequence[str], log: Path) -> subprocess.Popen:
        """Start another process (stdout and stderr to ``log``) that ``stop()`` ends with the rest."""
        self.helpers[name] = self._spawn(cmd, log)
        return self.helpers[name]

    def edges_done(self) -> bool:
        """True once every edge has exited with 0.

        Raises:
            DemoError: an edge exited with another status (the message names every edge that did),
                or the aggregator exited.
        """
        if any(proc.poll() not in (None, 0) for proc in self.edges.values()):
            # Edges refused for the same reason exit within moments of each other: name them all.
            deadline = time.monotonic() + FAILURE_GRACE_S
            for proc in self.edges.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            failed = [self._failure(name, p.returncode) for name, p in self.edges.items()]
            raise DemoError("; ".join(f for f in failed if f))
        if self.aggregator is not None and self.aggregator.poll() is not None:
            log = self.work / "aggregator" / "aggregator.log"
            raise DemoError(f"the aggregator exited with {self.aggregator.returncode}; see {log}")
        return all(proc.returncode == 0 for proc in self.edges.values())

    def wait_edges(self, timeout_s: float) -> None:
        """Wait for every edge to exit; raise DemoError if one fails or the time runs out."""
        deadline = time.monotonic() + timeout_s
        for name, proc in self.edges.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise DemoError(f"edge {name} still running after {timeout_s:.0f} s") from exc
            if failure := self._failure(name, code):
                raise DemoError(failure)

    def _failure(self, name: str, code: int | None) -> str:
        """What to say about edge ``name``'s exit status ``code`` ("" when it is still running or 0)."""
        if code in (None, 0):
            return ""
        return f"edge {name} exited with {code}; see {self.work / 'edges' / name / 'edge.log'}"

    def stop(self) -> None:
        """Stop every process this federation started (SIGTERM, then SIGKILL)."""
        procs = [p for p in [self.aggregator, *self.edges.values(), *self.helpers.values()] if p is not None]
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
    """ListRounds as an observer, as JSON (what `grpcurl ... ListRounds` shows).

    Raises:
        grpc.RpcError: the aggregator did not answer within 30 s.
    """
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


def scores_by_version(journal: Path) -> dict[int, dict]:
    """Held-out scores of the global model by state version, from an edge journal (``--val``)."""
    scores = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            if record.get("val"):
                scores[int(record["state_version"])] = record["val"]
    return scores
