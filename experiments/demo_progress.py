"""What the demo prints: live events of a running federation, and the table per round at the end.

The events come from files the processes write anyway, read a little at a time, and from the
aggregator's ListRounds: rounds opening, edges' epochs and batch losses (their logs), uploads as
the aggregator counts them, and the global model's held-out score that edge-0 logs (``--val``)
each time it loads a new global state.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import grpc

from fedocr.harness import LocalFederation, list_rounds

# edge_agent/agent.py: "round 7 (2/8) epoch 1/2: batch 40/250, loss 2.345" (batch lines every
# edge_agent.report.PROGRESS_EVERY_S) and "round 7 (2/8) epoch 1/2: loss 2.345, 61 images/s, 4.1 s".
EDGE_EPOCH = re.compile(
    r"round \d+ \((?P<at>\d+/\d+)\) epoch (?P<epoch>\d+/\d+): "
    r"(?:batch (?P<batch>\d+/\d+), loss (?P<loss>\S+)|loss (?P<mean>[^,]+), (?P<speed>\S+) images/s)"
)
# edge_agent/agent.py: "global state v3 on DIR: accuracy 41.3%, 1-NED 0.812, loss 1.234 (600 words)"
EDGE_SCORE = re.compile(r"global state v(?P<v>\d+) on .*: accuracy (?P<acc>\S+)%, 1-NED (?P<ned>[^,]+),")
EDGE_WARNING = re.compile(r" (?:WARNING|ERROR) edge_agent[.\w]*: (?P<message>.*)")
# recognizer/cli.py `train`: "epoch {'epoch': 2, 'loss': 2.3456, 'images_per_s': 60.1}"
SINGLE_EPOCH = re.compile(r"epoch \{'epoch': (?P<epoch>\d+), 'loss': (?P<loss>[^,]+),")
CLOSED = ("ROUND_STATE_CLOSED", "ROUND_STATE_FINISHED")


class Tail:
    """The complete lines appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def lines(self) -> list[str]:
        """New complete lines, without their line ends."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = self._partial + f.read()
        self._offset += len(data) - len(self._partial)
        *done, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in done]


class Watcher:
    """Prints the new events of a federation, oldest first, each time ``poll()`` is called.

    ``single_log`` is the log of a `recognizer train` run beside the federation (it may appear
    later); it trains for rounds x local epochs.
    """

    def __init__(self, fed: LocalFederation, single_log: Path | None = None) -> None:
        self.fed = fed
        self.total = fed.settings.rounds
        self.edge_logs: dict[str, Tail] = {}  # filled as edges start
        self.single = Tail(single_log) if single_log is not None else None
        self.started = False  # an edge has joined a round
        self.rounds: dict = {}  # the last ListRounds answer
        self._seen: set[tuple] = set()  # events told: ("open", round_id), ("up", round_id, edge)...
        self._scores: dict[int, tuple[float, str, str]] = {}  # state version -> (time, accuracy %, 1-NED)
        self._news: list[tuple[float, str]] = []  # (time, line) found by this poll

    def poll(self) -> None:
        """Print what happened since the last call."""
        try:
            self.rounds = list_rounds(self.fed.pki, self.fed.port)
        except grpc.RpcError:
            pass  # busy or restarting: the next poll catches up
        for r in self.rounds.get("rounds", []):
            self._round_events(r)
        for name in self.fed.edges:
            tail = self.edge_logs.setdefault(name, Tail(self.fed.work / "edges" / name / "edge.log"))
            for line in tail.lines():
                self._edge_line(name, line)
        self._score_events()
        for line in self.single.lines() if self.single is not None else []:
            self._single_line(line)
        for _, line in sorted(self._news, key=lambda news: news[0]):
            print(line, flush=True)
        self._news.clear()

    def _tell(self, when: float, line: str) -> None:
        self._news.append((when, line))

    def _once(self, *event: object) -> bool:
        """True the first time ``event`` is seen."""
        new = event not in self._seen
        self._seen.add(event)
        return new

    def _round_events(self, r: dict) -> None:
        at, rid, plan = f"round {r['round_index'] + 1}/{self.total}", r["round_id"], r["plan"]
        if self._once("open", rid):
            self._tell(
                _proto_time(r.get("opened_at")),
                f"{at} opened: {plan['local_epochs']} local epoch(s) at lr {plan['learning_rate']:g}, "
                f"batch {plan['batch_size']}, from global state v{r['state_version']}",
            )
        self.started = self.started or bool(r.get("edges"))
        for e in r.get("edges", []):
            if e.get("uploaded") and self._once("up", rid, e["edge_id"]):
                wire, raw = int(e["bytes"]["wire_up"]) / 1e6, int(e["bytes"]["raw_up"]) / 1e6
                self._tell(
                    _proto_time(e.get("uploaded_at")),
                    f"{at}: upload from {e['edge_id']} ({wire:.2f} MB wire, {raw:.2f} MB raw)",
                )
        if r["state"] == "ROUND_STATE_FAILED" and self._once("failed", rid):
            why = r.get("message") or "too few uploads"
            self._tell(_proto_time(r.get("closed_at")), f"{at} failed: {why}; it is tried again")

    def _edge_line(self, name: str, line: str) -> None:
        if m := EDGE_EPOCH.search(line):
            at = f"round {m['at']}: {name} epoch {m['epoch']}"
            if m["batch"]:
                self._tell(_log_time(line), f"{at} batch {m['batch']} loss {float(m['loss']):.3f}")
            else:
                self._tell(_log_time(line), f"{at} done, loss {float(m['mean']):.3f} ({m['speed']} images/s)")
        elif m := EDGE_SCORE.search(line):
            self._scores[int(m["v"])] = (_log_time(line), m["acc"], m["ned"])
        elif m := EDGE_WARNING.search(line):
            self._tell(_log_time(line), f"{name}: {m['message']}")

    def _single_line(self, line: str) -> None:
        if m := SINGLE_EPOCH.search(line):
            of = self.total * self.fed.settings.local_epochs
            self._tell(_log_time(line), f"single edge: epoch {m['epoch']}/{of} loss {float(m['loss']):.3f}")

    def _score_events(self) -> None:
        """Tell each global model's score once ListRounds says which round made it."""
        rounds = self.rounds.get("rounds", [])
        made_by = {int(r["state_version"]) + 1: r for r in rounds if r["state"] in CLOSED}
        initial = int(rounds[0]["state_version"]) if rounds else None
        for version, (when, acc, ned) in sorted(self._scores.items()):
            if version in made_by:
                r = made_by[version]
                at = f"round {r['round_index'] + 1}/{self.total}"
                self._tell(when, f"{at} closed after {r['duration_seconds']:.0f} s: global model {acc}% "
                                 f"word accuracy (1-NED {ned})")  # fmt: skip
            elif version == initial:
                self._tell(when, f"round 1/{self.total}: the initial model scores {acc}% (1-NED {ned})")
            else:
                continue  # ListRounds has not shown the round close yet
            del self._scores[version]


def _log_time(line: str) -> float:
    """When a log line was written (logging's asctime, local time), or now."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return time.time()


def _proto_time(stamp: str | None) -> float:
    """A Timestamp in ListRounds' JSON ("2025-01-02T03:04:05.123456789Z"), or now."""
    return datetime.fromisoformat(stamp).timestamp() if stamp else time.time()


def round_score(r: dict, scores: dict[int, dict]) -> dict:
    """The held-out score of the global model round ``r`` (ListRounds JSON) produced: the aggregator's
    federated evaluation when edges reported one, else ``scores`` by state version; {} if unknown."""
    reported = r.get("evaluation") or {}
    if int(reported.get("samples", 0)):
        return {"accuracy": reported.get("word_accuracy", 0.0),
                "char_accuracy": reported.get("char_accuracy", 0.0), "loss": reported.get("loss", 0.0)}
    return scores.get(int(r.get("state_version", 0)) + 1, {})


def round_table(rounds: dict, scores: dict[int, dict] | None = None) -> str:
    """A table per round: edges counted, bytes up and down (wire and raw), duration, and the held-out
    score of the global model the round produced (``round_score``), when known."""
    scores = scores or {}
    mb = lambda n: f"{int(n) / 1e6:.2f}"  # noqa: E731
    head = ("round", "state", "edges", "up wire MB", "up raw MB", "down wire MB", "down raw MB", "seconds",
            "acc %", "1-NED", "loss")  # fmt: skip
    rows = []
    for r in rounds.get("rounds", []):
        b = r["bytes"]
        uploaded = sum(1 for e in r.get("edges", []) if e.get("uploaded"))
        after = round_score(r, scores)
        rows.append((
            str(r["round_index"] + 1), r["state"].removeprefix("ROUND_STATE_"), str(uploaded),
            mb(b["wire_up"]), mb(b["raw_up"]), mb(b["wire_down"]), mb(b["raw_down"]),
            f"{r['duration_seconds']:.1f}",
            f"{100 * after['accuracy']:.1f}" if after else "-",
            f"{after['char_accuracy']:.3f}" if after else "-",
            f"{after['loss']:.3f}" if after else "-",
        ))  # fmt: skip
    t = rounds.get("total_bytes", {})
    rows.append(("total", "", "", *(mb(t.get(k, 0)) for k in ("wire_up", "raw_up", "wire_down", "raw_down")),
                 "", "", "", ""))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows])
