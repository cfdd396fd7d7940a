"""Optimizer choice, learning-rate decay and the sequence loss of the training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedocr.schedule import cosine_lr
from recognizer import charset
from recognizer.model import build_model
from recognizer.train import Proximal, WeightAverage, lr_at, make_optimizer, sequence_loss, train_step


def test_optimizers_by_name() -> None:
    model = nn.Linear(2, 2)
    assert isinstance(make_optimizer(model, 1.0), torch.optim.Adadelta)
    adam = make_optimizer(model, 1e-3, "adam")
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert isinstance(make_optimizer(model, 1e-3, "adamw"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="adam, adamw, adadelta"):
        make_optimizer(model, 1.0, "sgd")


def test_lr_decays_tenfold_at_each_point() -> None:
    assert [lr_at(step, 1.0, [5, 30]) for step in (0, 4, 5, 29, 30, 40)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )


def test_cosine_lr_holds_then_falls_smoothly_to_the_floor() -> None:
    lrs = [cosine_lr(step, 2.0, 100, 300) for step in range(400)]

    assert lrs[:101] == [2.0] * 101
    assert lrs[200] == pytest.approx(2.0 * (0.01 + 0.99 * 0.5))  # half-way: half-way down
    assert lrs[300:] == pytest.approx([0.02] * 100)
    assert all(a > b for a, b in zip(lrs[100:300], lrs[101:301], strict=True))


def test_sequence_loss_ignores_padding() -> None:
    classes = charset.get_alphabet(charset.DEFAULT_ALPHABET).num_classes
    targets = torch.tensor([[3, charset.EOS, charset.PAD]])
    logits = torch.zeros(1, 3, classes)
    logits[0, 2, 0] = 100.0  # a confident wrong guess at the padded position must not count
    assert sequence_loss(logits, targets).item() == pytest.approx(math.log(classes))


def test_a_proximal_term_holds_local_training_near_the_rounds_weights() -> None:
    """FedProx: with a large mu the weights drift less from where the round started than without."""
    torch.manual_seed(0)
    images, targets = torch.rand(8, 3, 32, 100) * 2 - 1, torch.randint(3, 30, (8, 6))
    drift = {}
    for mu in (0.0, 10.0):
        model = build_model("fedocr-tiny", bytes(32), 0.5)
        optimizer = make_optimizer(model, 0.01, "adam")
        start = [p.detach().clone() for p in model.parameters()]
        proximal = Proximal.around(model, mu) if mu else None
        for _ in range(6):
            train_step(model, images, targets, optimizer, proximal=proximal)
        moved = [float((p.detach() - s).norm() ** 2) for p, s in zip(model.parameters(), start, strict=True)]
        drift[mu] = sum(moved) ** 0.5
    assert drift[10.0] < 0.5 * drift[0.0], drift


def test_the_weight_average_follows_its_recurrence_and_copies_buffers() -> None:
    """After n updates each weight is the ramped exponential average of the weights it was given;
    BatchNorm's running statistics are averaged too, its step counter copied."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, 0.9)
    expected = model[0].weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(4, 3))  # moves the running statistics, counts a batch
        average.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(average.state["0.weight"], expected)
    assert int(average.state["1.num_batches_tracked"]) == 5
    assert not torch.equal(average.state["1.running_mean"], model[1].running_mean)

    average.copy_to(model)
    torch.testing.assert_close(model[0].weight, expected)
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(model, decay)
