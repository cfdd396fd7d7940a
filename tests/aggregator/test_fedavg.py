"""FedAvg math on tiny literal arrays with exact answers."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import fedavg
from fedocr.errors import MalformedRequest


def test_weighted_mean_of_two_increments_is_exact() -> None:
    total = np.zeros(3)
    fedavg.accumulate(total, np.array([1.0, 2.0, 3.0], dtype=np.float32), 1.0)
    fedavg.accumulate(total, np.array([4.0, 5.0, 6.0], dtype=np.float32), 3.0)
    state = np.array([10.0, 0.0, -1.0], dtype=np.float32)

    fedavg.apply_mean(state, total, 4.0)

    # (1*[1,2,3] + 3*[4,5,6]) / 4 = [3.25, 4.25, 5.25]
    np.testing.assert_array_equal(state, np.array([13.25, 4.25, 4.25], dtype=np.float32))


def test_accumulate_crosses_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fedavg, "BLOCK", 2)
    total = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    fedavg.accumulate(total, np.array([1, 2, 3, 4, 5], dtype=np.float32), 2.0)
    np.testing.assert_array_equal(total, [3.0, 5.0, 7.0, 9.0, 11.0])


def test_weights_samples_or_uniform() -> None:
    assert fedavg.weight_for(7, "samples") == 7.0
    assert fedavg.weight_for(7, "uniform") == 1.0
    assert fedavg.weight_for(0, "uniform") == 1.0
    with pytest.raises(MalformedRequest):
        fedavg.weight_for(0, "samples")
    with pytest.raises(ValueError):
        fedavg.weight_for(1, "median")


def test_layout_split_and_concat() -> None:
    assert fedavg.layout([2, 0, 3]) == [(0, 2), (2, 0), (2, 3)]
    flat = np.arange(5.0)
    a, b, c = fedavg.split(flat, [2, 0, 3])
    assert a.tolist() == [0.0, 1.0] and b.size == 0 and c.tolist() == [2.0, 3.0, 4.0]
    out = fedavg.concat_into(np.zeros(5), [np.array([9, 8]), np.array([]), np.array([7, 6, 5])], [2, 0, 3])
    assert out.tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]
    with pytest.raises(MalformedRequest):
        fedavg.concat_into(np.zeros(5), [np.array([9, 8])], [2, 0, 3])


def test_check_increment_rejects_nan_inf_and_wrong_length() -> None:
    fedavg.check_increment(np.array([0.0, 1.0], dtype=np.float32), 2)
    with pytest.raises(MalformedRequest, match="element 1"):
        fedavg.check_increment(np.array([0.0, np.nan]), 2)
    with pytest.raises(MalformedRequest):
        fedavg.check_increment(np.array([np.inf, 0.0]), 2)
    with pytest.raises(MalformedRequest, match="3 values"):
        fedavg.check_increment(np.zeros(3), 2)


def test_apply_mean_refuses_zero_weight() -> None:
    with pytest.raises(ValueError):
        fedavg.apply_mean(np.zeros(1, dtype=np.float32), np.zeros(1), 0.0)
