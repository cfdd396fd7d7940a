"""The averaging probe's mean of models (experiments/averaging.py)."""

import torch

from experiments.averaging import mean_state


def test_mean_state_averages_floats_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    mean = mean_state([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["w"].dtype == torch.float32
    assert mean["n"].item() == 3  # integer buffers (counters) are not averaged


def test_mean_of_one_model_is_that_model() -> None:
    a = {"w": torch.randn(5), "b": torch.randn(2, 2)}
    mean = mean_state([a])
    assert all(torch.allclose(mean[k], a[k]) for k in a)
