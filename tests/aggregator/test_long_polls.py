"""Long-polls hold no RPC thread: more waiting Joins than threads leave uploads their threads; calls
that wait to be taken up, for a busy loop or behind thousands of others, are not cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import numpy as np
from conftest import EDGES
from fedclient import manifest

from aggregator import server
from fedocr import tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

LENGTHS = [1000]


def test_more_waiting_polls_than_threads_do_not_hold_up_the_round(serve, connect) -> None:
    running = serve(quorum=9, min_edges=9, max_workers=2, max_concurrent_uploads=2, join_wait_max_s=30.0,
                    total_rounds=3)  # fmt: skip
    edges = [connect(running, f"edge-{k}") for k in range(9)]
    r = edges[0].join(LENGTHS).round_id
    for edge in edges[:8]:
        edge.join(LENGTHS)
        edge.upload(r, [np.full(LENGTHS[0], 0.5, np.float32)])
    answers: list[pb.JoinResponse] = []
    polls = [threading.Thread(target=lambda e=e: answers.append(e.join(LENGTHS, wait=30))) for e in edges[:8]]
    for t in polls:  # eight long-polls, four times the RPC threads, all waiting for the round to close
        t.start()
    time.sleep(0.5)
    assert not answers
    # On a thread per poll, this Join and upload would queue until the polls gave up (30 s) and
    # the polls would answer WAIT; here they go through and the polls answer with the next round.
    assert edges[8].join(LENGTHS).action == pb.JoinResponse.ACTION_TRAIN
    assert edges[8].upload(r, [np.zeros(LENGTHS[0], np.float32)]).committed_edges == 9
    for t in polls:
        t.join(20)
    assert len(answers) == 8
    assert {(a.action, a.round_id) for a in answers} == {(pb.JoinResponse.ACTION_TRAIN, r + 1)}


def _joins_while_the_loop_is_busy(running, clients, busy_s: float) -> list[pb.JoinResponse | grpc.RpcError]:
    """Joins sent at once while the server's event loop is held for ``busy_s`` (it takes up no call)."""
    answers: list[pb.JoinResponse | grpc.RpcError] = []

    def join(client) -> None:
        try:
            answers.append(client.join(LENGTHS))
        except grpc.RpcError as exc:
            answers.append(exc)

    running.loop.loop.call_soon_threadsafe(time.sleep, busy_s)
    time.sleep(0.2)
    threads = [threading.Thread(target=join, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


def test_calls_that_wait_for_a_busy_loop_are_not_cancelled(serve, connect, monkeypatch, tmp_path) -> None:
    # With grpc's default, a call the loop has not taken up within 30 s is cancelled (CANCELLED, which
    # edges do not retry); the server raises that limit past any edge's deadline. Shown at small scale:
    # a 1-second limit cancels Joins that wait 2.5 s for the loop; the server's own limit lets them through.
    monkeypatch.setattr(server, "UNREQUESTED_S", 1)
    short = serve(state_dir=tmp_path / "short")
    answers = _joins_while_the_loop_is_busy(short, [connect(short, f"edge-{k}") for k in range(4)], 2.5)
    codes = [a.code() for a in answers if isinstance(a, grpc.RpcError)]
    assert len(answers) == 4 and grpc.StatusCode.CANCELLED in codes, answers
    short.stop(grace=0.5)
    monkeypatch.undo()
    assert server.UNREQUESTED_S >= 600
    default = serve(state_dir=tmp_path / "default")
    answers = _joins_while_the_loop_is_busy(default, [connect(default, f"edge-{k}") for k in range(4)], 2.5)
    assert [getattr(a, "action", a) for a in answers] == [pb.JoinResponse.ACTION_TRAIN] * 4


def _burst_of_joins(running, agg_pki, calls_per_edge: int) -> Counter:
    """Every edge certificate's channel sends ``calls_per_edge`` Joins at once; how they end."""

    async def burst() -> Counter:
        ends: Counter = Counter()
        channels = []
        for k in range(EDGES):
            creds = tls.channel_credentials(agg_pki.ca, *agg_pki.pair(f"edge-{k}"))
            channels.append(grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds))
        request = pb.JoinRequest(manifest=manifest(LENGTHS))

        async def join(channel) -> None:
            try:
                await pb_grpc.FederationStub(channel).Join(request, timeout=60)
                ends["answered"] += 1
            except grpc.aio.AioRpcError as exc:
                ends[exc.code().name] += 1

        await asyncio.gather(*(join(c) for c in channels for _ in range(calls_per_edge)))
        for channel in channels:
            await channel.close()
        return ends

    return asyncio.run(burst())


def test_a_burst_of_thousands_of_calls_is_taken_up_not_rejected(serve, agg_pki, monkeypatch, tmp_path):
    # grpc core rejects (CANCELLED, at once) calls that arrive while more than its pending limits wait
    # to be taken up; thousands of edges re-polling together pass them. With a limit of 100 a burst of
    # 4,800 Joins loses calls (as grpc's defaults, 1,000 to 3,000, do at 10,000 edges); with the
    # server's limits none is lost.
    calls = 400 * EDGES
    monkeypatch.setattr(server, "MAX_PENDING_CALLS", 100)
    low = serve(state_dir=tmp_path / "low")
    ends = _burst_of_joins(low, agg_pki, 400)
    assert sum(ends.values()) == calls and ends["CANCELLED"] > 0, ends
    low.stop(grace=0.5)
    monkeypatch.undo()
    assert server.MAX_PENDING_CALLS >= 100_000
    default = serve(state_dir=tmp_path / "default")
    assert _burst_of_joins(default, agg_pki, 400) == Counter(answered=calls)
