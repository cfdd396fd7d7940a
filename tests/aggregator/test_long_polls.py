"""Join long-polls that hold most RPC threads are reported: uploads would queue behind them."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

LENGTHS = [1000]


def test_warns_once_when_long_polls_leave_no_thread_for_uploads(serve, connect, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="aggregator.longpoll")
    running = serve(quorum=3, min_edges=3, max_workers=4, max_concurrent_uploads=2)
    edges = [connect(running, f"edge-{k}") for k in range(3)]
    r = edges[0].join(LENGTHS).round_id
    for edge in edges[:2]:
        edge.join(LENGTHS)
        edge.upload(r, [np.full(LENGTHS[0], 0.5, np.float32)])
    answers: list[int] = []
    polls = [
        threading.Thread(target=lambda e=e: answers.append(e.join(LENGTHS, wait=10).action))
        for e in edges[:2]
    ]
    for t in polls:
        t.start()
    deadline = time.monotonic() + 5
    while "Join long-polls hold" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    edges[2].join(LENGTHS)
    assert edges[2].upload(r, [np.zeros(LENGTHS[0], np.float32)]).committed_edges == 3  # a thread was free
    for t in polls:
        t.join(10)
    warnings = [m for m in caplog.messages if "Join long-polls hold" in m]
    assert len(warnings) == 1 and "2 Join long-polls" in warnings[0] and "max_workers" in warnings[0]
    assert len(answers) == 2  # both polls ended when the round closed
