"""A leaf aggregator's rounds in-process (RoundCoordinator, real LMDB store, fake clock): it waits for
the root's first round, hands up its sum at quorum, keeps it across a restart, and ends its round
as the relay reports what the root did. tests/edge_agent/test_tiers.py runs the real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedclient import upload_messages
from test_secure_rounds import MANIFEST as SECURE_MANIFEST
from test_secure_rounds import Sim

from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.rounds import TrainingPlan, UpstreamRound
from aggregator.store import Manifest, Store
from fedocr.errors import RoundClosed

LENGTHS = (6, 4)
MANIFEST = Manifest(((0, LENGTHS[0], False), (1, LENGTHS[1], True)), b"\x11" * 32)
LEAF = {"root": "root:50051", "root_cert": Path("leaf.pem"), "root_key": Path("leaf.key")}


def plan(lr: float) -> TrainingPlan:
    return TrainingPlan(local_epochs=2, learning_rate=lr, batch_size=16, optimizer="adam")


class Leaf:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.config = AggregatorConfig(state_dir=state_dir, quorum=2, min_edges=2, **LEAF)
        self.store = Store(state_dir)
        self.fed = RoundCoordinator(self.config, self.store, clock=lambda: 1000.0)

    def restart(self) -> None:
        self.store.close()
        self.store = Store(self.dir)
        self.fed = RoundCoordinator(self.config, self.store, clock=lambda: 1000.0)

    def upload(self, edge: str, value: float, samples: int) -> None:
        r = self.fed.round_status()
        arrays = [np.full(n, value, dtype=np.float32) for n in LENGTHS]
        messages = upload_messages(r.round_id, arrays, samples, base_state_version=r.state_version)
        self.fed.upload(edge, iter(messages))


@pytest.fixture
def leaf(tmp_path: Path):
    made = Leaf(tmp_path / "leaf")
    yield made
    made.store.close()


def test_a_leaf_waits_for_the_root_then_hands_up_a_sum_that_survives_a_restart(leaf) -> None:
    assert leaf.fed.join("edge-0", MANIFEST, 0).action == "WAIT"  # no round before the root's
    assert leaf.fed.wait_manifest(0) == MANIFEST and leaf.fed.needs_state(1) and not leaf.fed.finished
    leaf.fed.adopt(UpstreamRound(4, 9, plan(0.125)), np.full(10, 0.5, dtype=np.float32), 5)
    joined = leaf.fed.join("edge-0", MANIFEST, 0)
    assert joined.action == "TRAIN" and joined.state_version == 5 and not leaf.fed.needs_state(5)
    assert (joined.round.round_index, joined.round.total_rounds, joined.round.plan) == (4, 9, plan(0.125))
    leaf.upload("edge-0", 1.0, samples=2)
    assert leaf.fed.wait_forwardable(0) is None  # quorum 2: not yet
    leaf.upload("edge-1", -3.0, samples=3)
    assert leaf.fed.round_status().state == "AGGREGATING"
    with pytest.raises(RoundClosed):
        leaf.upload("edge-2", 1.0, samples=1)
    forward = leaf.fed.wait_forwardable(0)
    assert (forward.weight, forward.uploads, forward.state_version) == (5, 2, 5)
    np.testing.assert_array_equal(forward.total, np.full(10, 2 * 1.0 + 3 * -3.0))  # weighted, not averaged

    leaf.restart()  # killed after handing up: the same sum goes up again
    again = leaf.fed.wait_forwardable(0)
    assert again.round_id == forward.round_id and np.array_equal(again.total, forward.total)

    leaf.fed.adopt(UpstreamRound(5, 9, plan(0.25)), np.full(10, -1.0, dtype=np.float32), 6, counted=True)
    done = leaf.fed.round_status(forward.round_id)
    assert done.state == "CLOSED" and "went to the root; root state version 6" in done.message
    now = leaf.fed.round_status()
    assert (now.state, now.round_index, now.state_version, now.plan.learning_rate) == ("OPEN", 5, 6, 0.25)
    np.testing.assert_array_equal(leaf.fed.global_state(), np.full(10, -1.0))

    end = UpstreamRound(5, 9, plan(0.25), finished=True)
    leaf.fed.adopt(end, np.zeros(10, dtype=np.float32), 7, counted=False)
    assert leaf.fed.finished and leaf.fed.join("edge-0", MANIFEST, 0).action == "FINISHED"
    assert leaf.fed.round_status(now.round_id).state == "FAILED"


def test_a_secure_leaf_hands_up_mean_times_weight_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    s = Sim(tmp_path / "secure-leaf", 3, **LEAF)
    try:
        assert s.fed.join(s.ids[0], SECURE_MANIFEST, 0).action == "WAIT"
        s.fed.adopt(UpstreamRound(0, 3, plan(0.1)), np.zeros(1000, dtype=np.float32), 1)
        s.whole_round(s.ids)
        assert s.round.state == "AGGREGATING"
        forward = s.fed.wait_forwardable(0)
        weight = sum(s.samples.values())
        want = s.expected(s.ids)
        assert forward.weight == weight
        assert np.all(np.abs(forward.total / weight - want) <= s.bound(s.ids, want))
        s.restart()
        assert np.array_equal(s.fed.wait_forwardable(0).total, forward.total)
    finally:
        s.store.close()
