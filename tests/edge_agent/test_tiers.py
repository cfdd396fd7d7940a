"""Two tiers: a root aggregator, two leaf aggregators and six edges, all real processes over mTLS,
end on the global state of a flat federation of the same six edges, bit for bit; a leaf killed
mid-round loses nothing it acknowledged and counts nothing twice."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedocr import harness, pki
from fedocr.harness import LocalFederation, Settings
from fedocr.harness.processes import Service
from recognizer.shard import split_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pytest runs in importlib mode

from test_federation import counted_rounds, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SETTINGS = Settings(rounds=2, local_epochs=1, preset="fedocr-tiny", gamma="1/2", batch_size=32)
EDGES = [f"edge-{k}" for k in range(6)]
LEAVES = {"leaf-a": EDGES[:3], "leaf-b": EDGES[3:]}


@pytest.fixture(scope="module")
def six(edge_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A PKI with six edges and two leaves, and each edge's shard (the two shards split in three)."""
    root = tmp_path_factory.mktemp("tiers")
    pki_dir = harness.make_pki(root / "pki", EDGES)
    for leaf in LEAVES:
        pki.issue(pki_dir, pki.ROLE_LEAF, leaf)
    shards = []
    for k, shard in enumerate(edge_data.shards):
        shards += split_dataset(shard, 3, root / f"shards{k}", seed=k)
    return pki_dir, dict(zip(EDGES, shards, strict=True))


def stored(state_dir: Path) -> tuple[np.ndarray, list]:
    store = Store(state_dir)
    try:
        snap = store.load()
        return snap.state.copy(), snap.history
    finally:
        store.close()


def start_leaf(
    fed: LocalFederation, name: str, root_port: int, port: int = 0, flags: tuple[str, ...] = ()
) -> Service:
    flags = [
        *SETTINGS.plan_flags(len(LEAVES[name])),
        *flags,
        "--root", f"127.0.0.1:{root_port}",
        "--root-cert", str(pki.cert_path(fed.pki, name)),
        "--root-key", str(pki.key_path(fed.pki, name)),
    ]  # fmt: skip
    home = fed.work / name
    return harness.start_aggregator(
        fed.pki, home / "state", home / "aggregator.log", f"127.0.0.1:{port}", flags=flags
    )


@pytest.fixture(scope="module")
def flat(six, federation_key: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list]:
    """The flat federation of the same six edges: its global state and rounds."""
    pki_dir, shards = six
    work = tmp_path_factory.mktemp("flat")
    with LocalFederation(work, pki_dir, federation_key, SETTINGS) as fed:
        fed.start_aggregator(len(EDGES))
        for edge in EDGES:
            fed.start_edge(edge, shards[edge])
        fed.wait_edges(300)
        fed.stop()
    return stored(work / "aggregator" / "state")


def test_two_tiers_equal_the_flat_federation_bit_for_bit(six, flat, federation_key: Path, tmp_path: Path):
    pki_dir, shards = six
    flat_state, flat_history = flat

    with LocalFederation(tmp_path / "tiers", pki_dir, federation_key, SETTINGS) as fed:
        root_port = fed.start_aggregator(len(LEAVES))  # the root: one upload per leaf closes a round
        leaves = {name: start_leaf(fed, name, root_port) for name in LEAVES}
        for name, service in leaves.items():
            fed.helpers[name] = service.popen
        fed.port = leaves["leaf-b"].port
        for edge in LEAVES["leaf-b"]:
            fed.start_edge(edge, shards[edge])
        # leaf-a: its first edge's upload is acknowledged, then the leaf is killed and restarted
        first, *rest = LEAVES["leaf-a"]
        fed.port = leaves["leaf-a"].port
        fed.start_edge(first, shards[first])
        journal = fed.work / "edges" / first / "rounds.jsonl"
        wait_for(lambda: journal.exists() and counted_rounds(fed, first), 240,
                 f"{first}'s upload to be acknowledged by leaf-a")
        os.killpg(leaves["leaf-a"].pid, signal.SIGKILL)
        leaves["leaf-a"].popen.wait(timeout=30)
        leaves["leaf-a"] = start_leaf(fed, "leaf-a", root_port, port=fed.port)
        fed.helpers["leaf-a"] = leaves["leaf-a"].popen
        for edge in rest:
            fed.start_edge(edge, shards[edge])
        fed.wait_edges(300)
        fed.stop()

    state, history = stored(tmp_path / "tiers" / "aggregator" / "state")
    assert [r.state for r in history] == [r.state for r in flat_history] == ["CLOSED", "CLOSED"]
    for r, f in zip(history, flat_history, strict=True):
        assert sorted(r.edges) == sorted(LEAVES) and all(e.uploaded for e in r.edges.values())
        # each leaf's weight is its edges' samples: the root's round weighs what the flat one did
        assert r.weight == f.weight == sum(e.samples for e in f.edges.values())
    assert np.array_equal(state, flat_state), "the two tiers' global state differs from the flat one"
    assert np.abs(state).max() > 0  # the rounds moved it

    _, leaf_a = stored(tmp_path / "tiers" / "leaf-a" / "state")
    assert [r.state for r in leaf_a] == ["CLOSED", "CLOSED"]
    assert all(sorted(e for e, rec in r.edges.items() if rec.uploaded) == LEAVES["leaf-a"] for r in leaf_a)
    assert "went to the root" in leaf_a[0].message
    log = (tmp_path / "tiers" / "leaf-a" / "aggregator.log").read_text()
    assert "resumed round 1 (index 0): 1 upload(s) committed" in log


def test_secure_leaves_forward_only_their_unmasked_sums(six, flat, federation_key: Path, tmp_path: Path):
    """Each leaf runs secure aggregation with its own three edges and forwards mean x weight."""
    pki_dir, shards = six
    flat_state, _ = flat
    with LocalFederation(tmp_path, pki_dir, federation_key, SETTINGS) as fed:
        root_port = fed.start_aggregator(len(LEAVES))
        for name, edges in LEAVES.items():
            leaf = start_leaf(fed, name, root_port, flags=("--secure-aggregation",))
            fed.helpers[name] = leaf.popen
            fed.port = leaf.port
            for edge in edges:
                fed.start_edge(edge, shards[edge])
        fed.wait_edges(300)
        fed.stop()
    state, history = stored(tmp_path / "aggregator" / "state")
    assert [sorted(r.edges) for r in history] == [sorted(LEAVES)] * 2
    for name in LEAVES:
        _, leaf_history = stored(tmp_path / name / "state")
        assert [r.state for r in leaf_history] == ["CLOSED", "CLOSED"]
        assert all(r.secure is not None and r.weight == 240 for r in leaf_history)
    # Secure aggregation's fixed point, and the second round's training from the state it gave, move
    # the state a little from the plain federation's (one run: median 3e-5, largest 8e-3 of a state
    # whose largest value is 0.11); a sum forwarded at the wrong scale would move all of it.
    diff = np.abs(state - flat_state)
    assert np.median(diff) < 1e-3 and diff.max() < 0.25 * np.abs(flat_state).max()


def test_a_leaf_whose_sum_missed_the_roots_round_fails_its_round(six, federation_key: Path, tmp_path: Path):
    """leaf-b waits for three edges and has one: the root closes at its deadline with leaf-a's sum."""
    pki_dir, shards = six
    root_settings = dataclasses.replace(SETTINGS, rounds=1, deadline_s=8.0, min_edges=1)
    with LocalFederation(tmp_path, pki_dir, federation_key, root_settings) as fed:
        root_port = fed.start_aggregator(len(LEAVES))
        for name, edges in LEAVES.items():
            leaf = start_leaf(fed, name, root_port)
            fed.helpers[name] = leaf.popen
            fed.port = leaf.port
            for edge in edges if name == "leaf-a" else edges[:1]:
                fed.start_edge(edge, shards[edge])
        fed.wait_edges(300)
        fed.stop()
    _, history = stored(tmp_path / "aggregator" / "state")
    closed = [r for r in history if r.state == "CLOSED"]
    assert [sorted(e for e, rec in r.edges.items() if rec.uploaded) for r in closed] == [["leaf-a"]]
    _, leaf_b = stored(tmp_path / "leaf-b" / "state")
    assert [r.state for r in leaf_b] == ["FAILED"]
    assert "before this leaf's sum reached it; 1 upload(s) dropped" in leaf_b[0].message
    _, leaf_a = stored(tmp_path / "leaf-a" / "state")
    assert [r.state for r in leaf_a] == ["CLOSED"] and "went to the root" in leaf_a[0].message
