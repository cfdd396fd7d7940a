"""FedAvg through the real server: weighted means over several rounds and edges, round closing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedocr.v1 import federation_pb2 as pb

LENGTHS = [5, 3]


def run_rounds(serve, connect, weighting: str, rounds: int = 3, edges: int = 3) -> None:
    running = serve(total_rounds=rounds, quorum=edges, min_edges=edges, weighting=weighting)
    clients = [connect(running, f"edge-{k}") for k in range(edges)]
    rng = np.random.default_rng(7)
    expected = [np.zeros(n) for n in LENGTHS]
    for t in range(rounds):
        increments, weights = [], []
        for k, client in enumerate(clients):
            reply = client.join(LENGTHS)
            assert reply.action == pb.JoinResponse.ACTION_TRAIN and reply.round_index == t
            header, state = client.download()
            for got, want in zip(state, expected, strict=True):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            inc = [rng.normal(size=n).astype(np.float32) for n in LENGTHS]
            samples = 10 * (k + 1) + t
            receipt = client.upload(
                reply.round_id, inc, samples=samples, base_state_version=header.state_version
            )
            assert receipt.committed_edges == k + 1 and receipt.edge_id == f"edge-{k}"
            increments.append(inc)
            weights.append(samples if weighting == "samples" else 1.0)
        assert receipt.round_state == pb.ROUND_STATE_CLOSED
        w = np.array(weights, dtype=np.float64)
        for j in range(len(LENGTHS)):
            stacked = np.stack([inc[j].astype(np.float64) for inc in increments])
            expected[j] = expected[j] + (w[:, None] * stacked).sum(0) / w.sum()
    header, state = clients[0].download()
    assert header.state_version == rounds + 1
    for got, want in zip(state, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert clients[0].join(LENGTHS).action == pb.JoinResponse.ACTION_FINISHED
    assert clients[0].get_round().state == pb.ROUND_STATE_FINISHED


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_fedavg_matches_weighted_mean(serve, connect, weighting: str) -> None:
    run_rounds(serve, connect, weighting)


def test_round_closes_at_deadline_with_minimum(serve, connect) -> None:
    running = serve(quorum=3, min_edges=2, deadline_s=1.0)
    a, b = connect(running, "edge-0"), connect(running, "edge-1")
    r = a.join(LENGTHS).round_id
    b.join(LENGTHS)
    a.upload(r, [np.ones(n, dtype=np.float32) for n in LENGTHS], samples=1)
    b.upload(r, [3 * np.ones(n, dtype=np.float32) for n in LENGTHS], samples=3)
    assert a.get_round().state == pb.ROUND_STATE_OPEN
    wait_for(lambda: a.get_round(r).state == pb.ROUND_STATE_CLOSED)
    _, state = a.download()
    np.testing.assert_allclose(state[0], np.full(5, 2.5), atol=1e-6)  # (1*1 + 3*3) / 4
    current = a.get_round()
    assert current.round_index == 1 and current.round_id == r + 1


def test_round_fails_below_minimum_and_reopens(serve, connect) -> None:
    running = serve(quorum=3, min_edges=2, deadline_s=1.0)
    a = connect(running, "edge-0")
    r = a.join(LENGTHS).round_id
    a.upload(r, [np.ones(n, dtype=np.float32) for n in LENGTHS])
    wait_for(lambda: a.get_round(r).state == pb.ROUND_STATE_FAILED)
    failed, current = a.get_round(r), a.get_round()
    assert "below the minimum of 2" in failed.message
    assert current.round_id == r + 1 and current.round_index == 0 and current.state == pb.ROUND_STATE_OPEN
    header, state = a.download()
    assert header.state_version == 1 and not state[0].any()  # the failed upload was not applied
    assert a.join(LENGTHS).round_id == r + 1  # the same edge trains the retry


def test_join_long_polls_until_the_next_round(serve, connect) -> None:
    running = serve(quorum=1, min_edges=1, total_rounds=2)
    a = connect(running, "edge-0")
    r = a.join(LENGTHS).round_id
    a.upload(r, [np.ones(n, dtype=np.float32) for n in LENGTHS])
    reply = a.join(LENGTHS, wait=2)
    assert reply.action == pb.JoinResponse.ACTION_TRAIN and reply.round_id == r + 1
    assert reply.state_version == 2
    header, held = a.download(held=2)
    assert header.unchanged and held is None


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
