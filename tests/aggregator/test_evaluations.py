"""Federated evaluation: edges' scores of a round's result kept in that round's durable record."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fedclient import code_of

from fedocr.v1 import federation_pb2 as pb

LENGTHS = [1000]


def score(samples: int, accuracy: float, loss: float = 0.5) -> pb.Evaluation:
    return pb.Evaluation(samples=samples, loss=loss, word_accuracy=accuracy, char_accuracy=0.9)


def report(client, version: int, generic: pb.Evaluation, personal: pb.Evaluation | None = None):
    request = pb.EvaluationReport(state_version=version, generic=generic)
    if personal is not None:
        request.personal.CopyFrom(personal)
    return client.stub.ReportEvaluation(request, timeout=10)


def test_scores_land_in_the_round_that_produced_the_state(serve, connect, tmp_path) -> None:
    running = serve(quorum=1, min_edges=1, total_rounds=3)
    a, b = connect(running, "edge-0"), connect(running, "edge-1")
    a.upload(a.join(LENGTHS).round_id, [np.ones(1000, np.float32)])  # round 1 closes: state version 2
    b.join(LENGTHS)

    assert report(a, 2, score(100, 0.5)).round_id == 1
    assert report(b, 2, score(300, 0.9), personal=score(300, 0.95)).round_id == 1
    report(a, 2, score(100, 0.7))  # a repeat replaces the edge's report
    status = connect(running, "ops").get_round(1)
    reported = [(e.edge_id, e.generic.word_accuracy) for e in status.evaluations]
    assert reported == [("edge-0", 0.7), ("edge-1", 0.9)]
    assert status.evaluations[1].personal.word_accuracy == pytest.approx(0.95)
    assert status.evaluation.samples == 400
    assert status.evaluation.word_accuracy == pytest.approx((100 * 0.7 + 300 * 0.9) / 400)

    running.stop(grace=0.5)
    again = serve(quorum=1, min_edges=1, total_rounds=3)  # the same state directory
    assert [e.edge_id for e in connect(again, "ops").get_round(1).evaluations] == ["edge-0", "edge-1"]


@pytest.mark.parametrize(
    "version, generic, expected",
    [
        (1, score(10, 0.5), grpc.StatusCode.NOT_FOUND),  # W_0: no round produced it
        (7, score(10, 0.5), grpc.StatusCode.NOT_FOUND),
        (2, score(0, 0.5), grpc.StatusCode.INVALID_ARGUMENT),
        (2, score(10, 1.5), grpc.StatusCode.INVALID_ARGUMENT),
        (2, score(10, 0.5, loss=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (2, pb.Evaluation(), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_reports_are_refused_and_change_nothing(serve, connect, version, generic, expected) -> None:
    running = serve(quorum=1, min_edges=1, total_rounds=3)
    a = connect(running, "edge-0")
    a.upload(a.join(LENGTHS).round_id, [np.ones(1000, np.float32)])
    assert code_of(report, a, version, generic) == expected
    assert code_of(report, connect(running, "ops"), 2, score(10, 0.5)) == grpc.StatusCode.PERMISSION_DENIED
    assert not connect(running, "ops").get_round(1).evaluations
