"""FedAvg through the real server: weighted means over several rounds and edges, round closing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from fedclient import code_of

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
    # byte accounting: 32 raw bytes per upload and per download; the final download counts in the last round
    listing = connect(running, "ops").list_rounds()
    raw = 4 * sum(LENGTHS)
    assert listing.total_bytes.raw_up == rounds * edges * raw
    assert listing.total_bytes.raw_down == (rounds * edges + 1) * raw
    assert listing.total_bytes.wire_up > 0 and listing.total_bytes.wire_down > 0
    first = listing.rounds[0]
    assert first.bytes.raw_up == edges * raw and len(first.edges) == edges
    assert all(e.bytes.raw_up == raw and e.bytes.raw_down == raw and e.uploaded for e in first.edges)
    assert (
        listing.state_version == rounds + 1
        and [r.state for r in listing.rounds] == [pb.ROUND_STATE_CLOSED] * rounds
    )


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
    running = serve(quorum=2, min_edges=2, total_rounds=2)
    a, b = connect(running, "edge-0"), connect(running, "edge-1")
    r = a.join(LENGTHS).round_id
    b.join(LENGTHS)
    a.upload(r, [np.ones(n, dtype=np.float32) for n in LENGTHS])
    assert a.join(LENGTHS, wait=0).action == pb.JoinResponse.ACTION_WAIT  # a already uploaded
    replies: list[pb.JoinResponse] = []
    poller = threading.Thread(target=lambda: replies.append(a.join(LENGTHS, wait=5)))
    poller.start()
    time.sleep(0.3)
    assert not replies  # still parked in the long-poll
    b.upload(r, [np.ones(n, dtype=np.float32) for n in LENGTHS])
    poller.join(5)
    assert replies[0].action == pb.JoinResponse.ACTION_TRAIN and replies[0].round_id == r + 1
    assert replies[0].state_version == 2 and replies[0].plan.local_epochs == 1
    header, held = a.download(held=2)
    assert header.unchanged and held is None


def test_concurrent_uploads_group_commit_to_the_exact_mean(serve, connect) -> None:
    edges = 8
    running = serve(quorum=edges, min_edges=edges, max_concurrent_uploads=3, weighting="samples")
    clients = [connect(running, f"edge-{k}") for k in range(edges)]
    r = [c.join(LENGTHS) for c in clients][0].round_id
    incs = [[np.full(n, k + 1, dtype=np.float32) for n in LENGTHS] for k in range(edges)]
    with ThreadPoolExecutor(edges) as pool:
        receipts = list(pool.map(lambda k: clients[k].upload(r, incs[k], samples=k + 1), range(edges)))
    assert sorted(x.committed_edges for x in receipts) == list(range(1, edges + 1))
    _, state = clients[0].download()
    weights = np.arange(1, edges + 1, dtype=np.float64)
    expected = (weights * weights).sum() / weights.sum()  # sum_k w_k * (k + 1) / sum_k w_k, w_k = k + 1
    np.testing.assert_allclose(state[0], np.full(LENGTHS[0], expected), rtol=0, atol=1e-6)


def test_draining_refuses_new_work(serve, connect) -> None:
    running = serve()
    a = connect(running, "edge-0")
    a.join(LENGTHS)
    running.federation.drain()
    assert code_of(a.join, LENGTHS) == grpc.StatusCode.UNAVAILABLE
    assert (
        code_of(a.upload, 1, [np.ones(n, dtype=np.float32) for n in LENGTHS]) == grpc.StatusCode.UNAVAILABLE
    )


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
