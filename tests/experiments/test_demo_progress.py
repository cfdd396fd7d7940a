"""The demo's table per round reads the aggregator's federated evaluation first."""

from __future__ import annotations

from experiments.demo_progress import round_score, round_table


def test_the_round_table_shows_the_aggregators_evaluation_or_the_edge_journal() -> None:
    bytes_ = {"wire_up": "10", "raw_up": "10", "wire_down": "5", "raw_down": "5"}
    reported = {"round_index": 0, "state": "ROUND_STATE_CLOSED", "state_version": "1", "bytes": bytes_,
                "duration_seconds": 2.0, "evaluation": {"samples": "300", "word_accuracy": 0.5,
                                                        "char_accuracy": 0.75, "loss": 1.5}}
    journaled = {**reported, "round_index": 1, "state_version": "2", "evaluation": {}}
    scores = {2: {"accuracy": 0.9, "char_accuracy": 0.5, "loss": 9.0},
              3: {"accuracy": 0.25, "char_accuracy": 0.6, "loss": 2.0}}
    assert round_score(reported, scores)["accuracy"] == 0.5  # the aggregator's, not the journal's 0.9
    assert round_score(journaled, scores)["accuracy"] == 0.25
    assert round_score(journaled, {}) == {}
    table = round_table({"rounds": [reported, journaled], "total_bytes": bytes_}, scores).splitlines()
    assert table[1].split()[-3:] == ["50.0", "0.750", "1.500"]
    assert table[2].split()[-3:] == ["25.0", "0.600", "2.000"]
