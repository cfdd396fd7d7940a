"""The averaging probe's mean of models (experiments/averaging.py)."""

import torch
from torch import nn

from experiments.averaging import mean_state, server_step
from recognizer import state


def _model(weight: float, running_mean: float, batches: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[1].running_mean.fill_(running_mean)
        model[1].num_batches_tracked.fill_(batches)
    return model


def test_mean_state_averages_floats_and_keeps_integer_buffers() -> None:
    a, b = _model(1.0, 2.0, 3), _model(3.0, 6.0, 7)
    state.load_state(a, mean_state([a, b]))
    assert torch.equal(a[0].weight, torch.full((2, 2), 2.0))
    assert torch.equal(a[1].running_mean, torch.full((2,), 4.0))
    assert a[0].weight.dtype == torch.float32
    assert a[1].num_batches_tracked.item() == 3  # integer buffers (counters) are not averaged


def test_mean_of_one_model_is_that_model() -> None:
    a = _model(0.0, 0.0, 0)
    with torch.no_grad():
        a[0].weight.copy_(torch.randn(2, 2))
        a[1].running_var.copy_(torch.rand(2))
    mean = mean_state([a])
    assert all(torch.allclose(m, t) for m, t in zip(mean, state.export_state(a), strict=True))


def test_a_server_learning_rate_scales_the_parameters_step_and_not_the_running_statistics() -> None:
    old, new = _model(1.0, 2.0, 0), _model(3.0, 6.0, 0)
    params = len(list(old.parameters()))
    mean = mean_state([new])
    stepped = server_step(state.export_state(old), mean, 2.0, params)
    state.load_state(old, stepped)
    assert torch.equal(old[0].weight, torch.full((2, 2), 5.0))  # 1 + 2 x (3 - 1)
    assert torch.equal(old[1].running_mean, torch.full((2,), 6.0))  # the plain mean
    same = server_step(state.export_state(new), mean, 2.0, params)
    assert all(torch.equal(a, b) for a, b in zip(same, mean, strict=True))  # no increment, no step
