"""Tests for recognizer.hashing: R[Idx] forward, Eq. 3 gradients, sizes, keys, learning, caching."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from recognizer.hashing import (
    cached_weights,
    hash_model,
    hashed_layers,
    keyed_permutation,
    real_count,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {
        "conv": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
        "linear": lambda: nn.Linear(5, 3),
        "lstm": lambda: nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True),
        "gru": lambda: nn.GRU(4, 3, batch_first=True),
        "grucell": lambda: nn.GRUCell(4, 3),
        "embedding": lambda: nn.Embedding(6, 4),
    }[kind]()


def _input(kind: str) -> torch.Tensor:
    torch.manual_seed(1)
    if kind == "conv":
        return torch.randn(2, 3, 5, 6)
    if kind in ("lstm", "gru"):
        return torch.randn(2, 5, 4)
    if kind == "embedding":
        return torch.tensor([[0, 5, 2], [3, 3, 1]])
    return torch.randn(2, 5 if kind == "linear" else 4)


def _out(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def _explicit(plain: nn.Module, hashed: nn.Module) -> nn.Module:
    """A plain copy whose weights are set to R[Idx] by advanced indexing (not index_select)."""
    explicit = copy.deepcopy(plain)
    with torch.no_grad():
        for name in hashed._hash_specs:
            real = getattr(hashed, name + "_real")
            getattr(explicit, name).copy_(real[hashed.index_map(name).long()])
    return explicit


KINDS = ["conv", "linear", "lstm", "gru", "grucell", "embedding"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_hashed_forward_equals_explicit_gather(kind, gamma):
    plain, x = _layer(kind), _input(kind)
    hashed = hash_model(copy.deepcopy(plain), KEY, gamma)

    got = _out(hashed, x)

    torch.testing.assert_close(got, _out(_explicit(plain, hashed), x), rtol=0, atol=0)
    if gamma == 1.0:  # a pure secret permutation: the plain network exactly
        torch.testing.assert_close(got, _out(plain, x), rtol=0, atol=0)
    else:
        assert not torch.allclose(got, _out(plain, x))


@pytest.mark.parametrize("kind", ["linear", "conv", "grucell"])
def test_real_gradient_is_eq3_sum_over_virtual_entries(kind):
    plain, x = _layer(kind), _input(kind)
    hashed = hash_model(copy.deepcopy(plain), KEY, 0.25)
    explicit = _explicit(plain, hashed)

    (_out(hashed, x) ** 2).sum().backward()
    (_out(explicit, x) ** 2).sum().backward()

    for name in hashed._hash_specs:
        g = getattr(explicit, name).grad.reshape(-1).tolist()  # dL/dV, Eq. 1
        idx = hashed.index_map(name).reshape(-1).tolist()
        real = getattr(hashed, name + "_real")
        brute = [sum(g[e] for e in range(len(idx)) if idx[e] == k) for k in range(real.numel())]
        torch.testing.assert_close(real.grad, torch.tensor(brute), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.25, 0.125, 0.3])
def test_real_counts_are_ceil_gamma_t(gamma):
    layer = hash_model(nn.Linear(10, 7), KEY, gamma)

    infos = {t.name: t for t in hashed_layers(layer)}

    assert infos["weight"].virtual == 70 and infos["bias"].virtual == 7
    assert infos["weight"].real == math.ceil(gamma * 70) == layer.weight_real.numel()
    assert infos["bias"].real == math.ceil(gamma * 7) == layer.bias_real.numel()
    idx = layer.index_map("weight")
    assert idx.shape == (7, 10) and idx.dtype == torch.int32
    assert int(idx.min()) == 0 and int(idx.max()) < infos["weight"].real


def test_real_count_literals_and_scaling():
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    total = sum(p.numel() for p in lstm.parameters())

    reals = {
        g: sum(t.real for t in hashed_layers(hash_model(copy.deepcopy(lstm), KEY, g)))
        for g in (1, 0.5, 0.125)
    }

    assert real_count(70, 0.25) == 18 and real_count(7, 0.25) == 2 and real_count(5, 1) == 5
    assert reals[1] == total
    assert total / 2 <= reals[0.5] <= total / 2 + 16 and total / 8 <= reals[0.125] <= total / 8 + 16


def test_gamma_one_index_map_is_a_permutation_and_each_real_entry_is_used():
    layer = hash_model(nn.Linear(6, 5), KEY, 1.0)

    idx = layer.index_map("weight").reshape(-1)

    assert sorted(idx.tolist()) == list(range(30))
    assert idx.tolist() != list(range(30))
    quarter = hash_model(nn.Linear(6, 5), KEY, 0.25).index_map("weight").reshape(-1)
    assert sorted(set(quarter.tolist())) == list(range(8))


@pytest.mark.parametrize("gamma", [0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_gamma_is_a_clear_value_error(gamma):
    with pytest.raises(ValueError, match="gamma"):
        hash_model(nn.Linear(2, 2), KEY, gamma)


def test_same_key_same_maps_and_weights_other_key_different():
    a, b, c = (hash_model(_layer("lstm"), k, 0.5) for k in (KEY, KEY, OTHER_KEY))

    for name in a._hash_specs:
        assert torch.equal(a.index_map(name), b.index_map(name))
        assert torch.equal(getattr(a, name + "_real"), getattr(b, name + "_real"))
    assert not torch.equal(a.index_map("weight_hh_l1"), c.index_map("weight_hh_l1"))
    assert not torch.equal(a.weight_hh_l1_real, c.weight_hh_l1_real)


def test_keyed_permutation_is_deterministic_and_label_dependent():
    p = keyed_permutation(KEY, "idx/a/weight", 50)

    assert sorted(p.tolist()) == list(range(50))
    assert p.tolist() == keyed_permutation(KEY, "idx/a/weight", 50).tolist()
    assert p.tolist() != keyed_permutation(KEY, "idx/b/weight", 50).tolist()
    assert keyed_permutation(KEY, "x", 1).tolist() == [0] and keyed_permutation(KEY, "x", 0).size == 0


def _train(model: nn.Module, loss_fn, steps: int) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_hashed_lstm_learns():
    torch.manual_seed(0)
    lstm = hash_model(nn.LSTM(2, 6, num_layers=2, bidirectional=True, batch_first=True), KEY, 0.5)
    head = nn.Linear(12, 1)
    x = torch.randn(16, 4, 2)
    target = x[:, :, 0].sum(1, keepdim=True) * 0.3  # a running sum of one input channel
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}

    first, last = _train(
        nn.ModuleList([lstm, head]), lambda: ((head(lstm(x)[0].mean(1)) - target) ** 2).mean(), 60
    )

    assert last < 0.1 * first
    assert len(before) == 16 and all(n.endswith("_real") for n in before)
    assert all(not torch.equal(p, before[n]) for n, p in lstm.named_parameters())


def test_hashed_grucell_learns_under_cached_weights():
    torch.manual_seed(0)
    cell = hash_model(nn.GRUCell(3, 8), KEY, 0.25)
    head = nn.Linear(8, 1)
    x = torch.randn(16, 5, 3)
    target = x[:, :, 1].mean(1, keepdim=True)
    before = {n: p.detach().clone() for n, p in cell.named_parameters()}

    def loss():
        h = torch.zeros(16, 8)
        with cached_weights(cell):  # one gather per forward, reused by all five steps
            for t in range(5):
                h = cell(x[:, t], h)
        return ((head(h) - target) ** 2).mean()

    first, last = _train(nn.ModuleList([cell, head]), loss, 80)

    assert last < 0.1 * first
    assert all(not torch.equal(p, before[n]) for n, p in cell.named_parameters())


def test_cached_weights_gathers_once_and_notices_updates():
    layer = hash_model(nn.Linear(3, 2), KEY, 0.5)

    with cached_weights(layer):
        first, again = layer.weight, layer.weight
        with torch.no_grad():
            layer.weight_real.add_(1.0)
        updated = layer.weight
    outside = layer.weight, layer.weight

    assert first is again
    assert updated is not first and torch.equal(updated, first + 1.0)
    assert outside[0] is not outside[1] and torch.equal(outside[0], updated)


def test_cached_and_uncached_steps_agree():
    torch.manual_seed(0)
    a = hash_model(nn.GRUCell(3, 4), KEY, 0.5)
    b = copy.deepcopy(a)
    x = torch.randn(2, 3)

    def run(cell):
        h = torch.zeros(2, 4)
        for _ in range(4):
            h = cell(x, h)
        h.sum().backward()
        return h

    with cached_weights(a):
        ha = run(a)
    hb = run(b)

    torch.testing.assert_close(ha, hb)
    torch.testing.assert_close(a.weight_hh_real.grad, b.weight_hh_real.grad)


def test_model_level_hashing_leaves_batchnorm_and_hides_index_maps():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3))

    hash_model(model, KEY, 0.5)

    assert [t.name for t in hashed_layers(model)] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert isinstance(model[1].weight, nn.Parameter)
    assert not any(k.endswith("_idx") for k in model.state_dict())
    assert model(torch.randn(2, 1, 3, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="already hashed"):
        hash_model(model, KEY, 0.5)


def test_hashed_layers_survive_deepcopy_and_bias_free_layers():
    lstm = hash_model(nn.LSTM(3, 2, bias=False), KEY, 0.5)
    conv = hash_model(nn.Conv2d(1, 1, 2, bias=False), KEY, 0.5)
    x = torch.randn(4, 1, 3)

    copied = copy.deepcopy(lstm)

    torch.testing.assert_close(copied(x)[0], lstm(x)[0])
    assert conv.bias is None and [t.name for t in hashed_layers(conv)] == ["weight"]


def test_embedding_options_that_cannot_be_hashed_are_refused():
    with pytest.raises(ValueError, match="max_norm"):
        hash_model(nn.Embedding(4, 2, max_norm=1.0), KEY, 0.5)
