"""A lying server, for real: the real aggregator process with one lie in its secure-aggregation
replies (lying_aggregator.py), real mutual TLS, and light edge processes that run the protocol with
edge_agent.secure.protocol. Each lie is caught by the edges it was told to: they stop the round on
their side with a message that names it, and reveal nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pytest runs in importlib mode

from test_crashes import CONFIG, Aggregator, wait_until  # noqa: E402
from test_secure_aggregation import NAMES, SECURE, procs  # noqa: E402, F401

LYING = Path(__file__).resolve().parent / "lying_aggregator.py"


class LyingAggregator(Aggregator):
    """`aggregator serve` through lying_aggregator.py with one lie."""

    def __init__(self, lie: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lie = lie

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("aggregator.cli")  # [python, -m, aggregator.cli, serve, ...]
        return [cmd[0], str(LYING), self.lie, *cmd[at + 1 :]]


def events(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.events.jsonl"
    return [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []


def settled(out: Path, name: str) -> dict | None:
    """The edge's first event that ends its part in a round: distrust, left, refused or receipt."""
    ends = ("distrust", "left", "refused", "receipt")
    return next((e for e in events(out, name) if e["kind"] in ends), None)


@pytest.mark.parametrize(
    ("lie", "told", "says"),
    [
        ("key", ["edge-0", "edge-2", "edge-3"], "advertisement of 'edge-1' is not signed"),
        ("threshold", NAMES, "threshold 2 is not a majority"),
        ("survivors", ["edge-0"], None),
    ],
)
def test_each_lie_of_the_server_is_caught_by_the_edges_it_was_told_to(
    fault_pki, tmp_path: Path, procs, lie: str, told: list[str], says: str | None  # noqa: F811
) -> None:
    agg = LyingAggregator(lie, fault_pki, tmp_path, "--rounds", "1", "--quorum", "4", "--min-edges", "3")
    agg.flags += ("--deadline", "60", "--weighting", "samples")
    agg.config.write_text(CONFIG + SECURE.format(phase_s=5))
    procs.aggregators.append(agg)
    agg.start()
    out = tmp_path / "edges"
    out.mkdir()
    for name in NAMES:
        procs.edge(fault_pki, agg.port, name, out)
    wait_until(lambda: all(settled(out, n) for n in told), 90, f"{told} to settle under the {lie} lie")
    for name in told:
        kinds = [e["kind"] for e in events(out, name)]
        assert "revealed" not in kinds, (name, kinds)  # nothing of any edge's secrets left it
        if says is not None:  # caught before dealing anything
            assert settled(out, name)["kind"] == "distrust" and says in settled(out, name)["details"]
            assert "shared" not in kinds and "uploaded" not in kinds, (name, kinds)
    if lie == "survivors":
        # Shown edge-3 as dropped, edge-0 would reveal shares of edge-3's mask key while the others
        # reveal its self-mask seed: it waits instead for threshold signatures of the lists it was
        # shown, which never come (it stops when it sees the others' signatures of theirs).
        kinds = [e["kind"] for e in events(out, "edge-0")]
        assert "confirmed" in kinds, kinds
    assert "Traceback" not in agg.logs()


pytestmark = pytest.mark.timeout(300)
