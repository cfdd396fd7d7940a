"""A federation on this machine: one aggregator and N edge agents as child processes, with the
round plan they share.

`make demo` (experiments/demo.py), `make experiment` (experiments/runs.py) and the end-to-end tests
start federations with this module. Every file a federation writes stays under its working directory:

    WORK/aggregator/aggregator.log, WORK/aggregator/state/
    WORK/edges/NAME/edge.log, WORK/edges/NAME/rounds.jsonl (the edge's journal), .../final.npz
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedocr.harness.processes import HarnessError, Service, spawn, stop_many
from fedocr.harness.services import edge_command, start_aggregator

FAILURE_GRACE_S = 5.0  # how long edges_done waits, after one edge failed, for the others to fail too


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
    download_encoding: str = "float32"  # the downloads': float32 is the whole state, else each change
    proximal_mu: float = 0.0  # FedProx's mu in the plan (0: off)
    warmup_rounds: int = 0  # first rounds in which edges train on words they render themselves
    warmup_words: int = 2000
    warmup_styles: str = "varied"
    warmup_labels: str = "words"
    warmup_rehearsal: float = 0.0  # after warm-up, warm-up words drawn per shard image each round (0: off)
    server_optimizer: str = "fedavg"  # how the mean increment moves the state (aggregator.server_opt)
    server_lr: float = 0.0  # the server optimizer's lr (0: its default)
    server_beta1: float = 0.0  # its momentum or first-moment decay (0: its default)
    server_tau: float = 0.0  # fedadam's and fedyogi's floor under sqrt(v) (0: its default)
    extra_edge_args: tuple[str, ...] = ()
    secure_aggregation: bool = False  # masked uploads; the server learns only each round's sum
    secure_code_bits: int = 0  # with secure_aggregation: the parameters as b-bit codes (0: 32-bit)

    def plan_flags(self, n_edges: int) -> list[str]:
        """The aggregator's flags for this round plan with ``n_edges`` edges."""
        decays = [r for r in self.lr_decay_rounds.split(",") if r]
        return [
            "--rounds", str(self.rounds),
            "--quorum", str(self.quorum or n_edges),
            "--min-edges", str(self.min_edges),
            "--deadline", str(self.deadline_s),
            "--local-epochs", str(self.local_epochs),
            "--lr", str(self.lr),
            "--batch-size", str(self.batch_size),
            "--optimizer", self.optimizer,
            "--encoding", self.encoding,
            "--download-encoding", self.download_encoding,
            "--proximal-mu", str(self.proximal_mu),
            "--warmup-rounds", str(self.warmup_rounds),
            "--warmup-words", str(self.warmup_words),
            "--warmup-styles", self.warmup_styles,
            "--warmup-labels", self.warmup_labels,
            *(["--warmup-rehearsal", str(self.warmup_rehearsal)] if self.warmup_rehearsal else []),
            "--lr-decay-rounds", self.lr_decay_rounds,
            "--lr-decay-factors", ",".join(f"{0.1 ** (i + 1):g}" for i in range(len(decays))),
            "--lr-cosine-from-round", str(self.lr_cosine_from_round),
            "--server-optimizer", self.server_optimizer,
            *(["--server-lr", str(self.server_lr)] if self.server_lr else []),
            *(["--server-beta1", str(self.server_beta1)] if self.server_beta1 else []),
            *(["--server-tau", str(self.server_tau)] if self.server_tau else []),
            *(["--secure-aggregation"] if self.secure_aggregation else []),
            *(["--secure-code-bits", str(self.secure_code_bits)] if self.secure_code_bits else []),
        ]  # fmt: skip

    def edge_flags(self) -> list[str]:
        """The edges' model and training flags."""
        return [
            "--preset", self.preset, "--gamma", self.gamma, "--threads", str(self.threads),
            "--optimizer", self.optimizer, *self.extra_edge_args,
        ]  # fmt: skip


@dataclass
class LocalFederation:
    """One aggregator, N edge agents and any helper processes as children; ``stop()`` (or leaving
    its ``with`` block) ends them all."""

    work: Path
    pki: Path
    key: Path
    settings: Settings
    aggregator: Service | None = None
    port: int = 0
    edges: dict[str, subprocess.Popen] = field(default_factory=dict)
    helpers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start_aggregator(self, n_edges: int, port: int = 0) -> int:
        """Start the aggregator on 127.0.0.1:``port`` (0: an ephemeral port); returns the port.

        A restart with the same state directory resumes the federation where it stood.
        """
        home = self.work / "aggregator"
        flags = self.settings.plan_flags(n_edges)
        self.aggregator = start_aggregator(
            self.pki, home / "state", home / "aggregator.log", f"127.0.0.1:{port}", flags=flags
        )
        self.port = self.aggregator.port
        return self.port

    def start_edge(self, name: str, shard: Path, val: Path | None = None) -> subprocess.Popen:
        """Start edge ``name`` on ``shard``; its log and work directory are under work/edges/name."""
        home = self.work / "edges" / name
        flags = [*self.settings.edge_flags(), *(["--val", str(val)] if val is not None else [])]
        server = f"127.0.0.1:{self.port}"
        self.edges[name] = spawn(edge_command(self.pki, name, server, self.key, shard, home, flags),
                                 home / "edge.log")  # fmt: skip
        return self.edges[name]

    def start_helper(self, name: str, cmd: Sequence[str], log: Path) -> subprocess.Popen:
        """Start another process (stdout and stderr to ``log``) that ``stop()`` ends with the rest."""
        self.helpers[name] = spawn(cmd, log)
        return self.helpers[name]

    def edges_done(self) -> bool:
        """True once every edge has exited with 0.

        Raises:
            HarnessError: an edge exited with another status (the message names every edge that
                did), or the aggregator exited.
        """
        if any(proc.poll() not in (None, 0) for proc in self.edges.values()):
            # Edges refused for the same reason exit within moments of each other: name them all.
            deadline = time.monotonic() + FAILURE_GRACE_S
            for proc in self.edges.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            failed = [self._failure(name, p.returncode) for name, p in self.edges.items()]
            raise HarnessError("; ".join(f for f in failed if f))
        if self.aggregator is not None and self.aggregator.popen.poll() is not None:
            code = self.aggregator.popen.returncode
            raise HarnessError(f"the aggregator exited with {code}; see {self.aggregator.log}")
        return all(proc.returncode == 0 for proc in self.edges.values())

    def wait_edges(self, timeout_s: float) -> None:
        """Wait for every edge to exit; raise HarnessError as soon as one fails, or when the time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            codes = {name: proc.poll() for name, proc in self.edges.items()}
            if failed := [f for name, code in codes.items() if (f := self._failure(name, code))]:
                raise HarnessError("; ".join(failed))
            if all(code == 0 for code in codes.values()):
                return
            if time.monotonic() > deadline:
                running = next(name for name, code in codes.items() if code is None)
                raise HarnessError(f"edge {running} still running after {timeout_s:.0f} s")
            time.sleep(0.1)

    def _failure(self, name: str, code: int | None) -> str:
        """What to say about edge ``name``'s exit status ``code`` ("" when it is still running or 0)."""
        if code in (None, 0):
            return ""
        return f"edge {name} exited with {code}; see {self.work / 'edges' / name / 'edge.log'}"

    def children(self) -> Iterator[subprocess.Popen]:
        """Every process started, the aggregator first."""
        yield from [self.aggregator.popen] if self.aggregator is not None else []
        yield from self.edges.values()
        yield from self.helpers.values()

    def stop(self) -> None:
        """Stop every process this federation started (SIGTERM to all, then SIGKILL to the slow)."""
        stop_many(list(self.children()))


def scores_by_version(journal: Path) -> dict[int, dict]:
    """Held-out scores of the global model by state version, from an edge journal (``--val``)."""
    scores = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            if record.get("val"):
                scores[int(record["state_version"])] = record["val"]
    return scores
