"""Long-polls hold no RPC thread: more waiting Joins than threads leave uploads their threads."""

from __future__ import annotations

import threading
import time

import numpy as np

from fedocr.v1 import federation_pb2 as pb

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
