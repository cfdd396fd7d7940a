"""Tests for recognizer.state: export/load, keyed pack/unpack and the fingerprint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from recognizer.hashing import hash_model
from recognizer.state import (
    STAT_SCALE,
    export_state,
    fingerprint,
    load_packed,
    load_state,
    pack_model,
    pack_state,
    state_lengths,
    statistics_length,
    unpack_state,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.bn(self.conv(x)).mean(2).transpose(1, 2)  # (B, W, 2)
        return self.fc(self.lstm(f)[0][:, -1])


def _net(key: bytes = KEY, gamma: float = 0.5, seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return hash_model(_Net(), key, gamma)


def test_export_is_flat_float32_in_canonical_order():
    net = _net()

    state = export_state(net)

    # conv w/b (18, 2 -> 9, 1), bn w/b, lstm 4 x real, fc w/b, bn running mean/var; no num_batches_tracked
    assert state_lengths(net) == [9, 1, 2, 2, 12, 18, 6, 6, 6, 2, 2, 2]
    assert [t.numel() for t in state] == state_lengths(net)
    assert all(t.dtype == torch.float32 and t.dim() == 1 for t in state)
    assert torch.equal(state[-1], torch.full((2,), STAT_SCALE))  # bn.running_var starts at one, scaled


def test_export_returns_copies():
    net = _net()
    state = export_state(net)

    with torch.no_grad():
        net.conv.weight_real.add_(1.0)

    assert not torch.equal(state[0], net.conv.weight_real)


def test_export_load_round_trip_restores_outputs():
    net, other = _net(seed=0), _net(seed=1)
    x = torch.randn(2, 1, 3, 5)
    net.eval(), other.eval()
    assert not torch.allclose(net(x), other(x))

    load_state(other, export_state(net))

    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(other.bn.running_var, net.bn.running_var)


def test_load_state_refuses_wrong_count_and_length_before_copying():
    net = _net()
    state = export_state(net)
    bad = [t + 1 for t in state[:-1]] + [torch.zeros(3)]

    with pytest.raises(ValueError, match="state has 11 tensors, this model expects 12"):
        load_state(net, state[:-1])
    with pytest.raises(
        ValueError, match=r"state tensor 11 of 12 \(bn.running_var\): expected 2 values, got 3"
    ):
        load_state(net, bad)
    assert all(torch.equal(a, b) for a, b in zip(export_state(net), state, strict=True))


def test_pack_unpack_round_trip_on_literals():
    tensors = [torch.tensor([1.0, 2.0]), np.array([3.0, 4.0, 5.0], dtype=np.float32)]

    packed = pack_state(tensors, KEY)
    a, b = unpack_state(packed, KEY, [2, 3])

    assert packed.dtype == np.float32 and packed.shape == (5,)
    assert sorted(packed.tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, 4.0, 5.0]


def test_pack_shuffles_and_wrong_key_scrambles():
    values = np.arange(64, dtype=np.float32)

    packed = pack_state([values], KEY)
    (wrong,) = unpack_state(packed, OTHER_KEY, [64])

    assert packed.tolist() != values.tolist()
    assert packed.tolist() != pack_state([values], OTHER_KEY).tolist()
    assert wrong.tolist() != values.tolist() and sorted(wrong.tolist()) == values.tolist()


def test_packing_is_linear_so_increments_work_on_packed_vectors():
    net = _net()
    base = export_state(net)
    with torch.no_grad():
        net.fc.weight_real.mul_(2.0)
    local = export_state(net)

    delta = pack_state(local, KEY) - pack_state(base, KEY)
    restored = unpack_state(pack_state(base, KEY) + delta, KEY, state_lengths(net))

    assert all(np.array_equal(r, t.numpy()) for r, t in zip(restored, local, strict=True))


def test_unpack_refuses_wrong_length():
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        unpack_state(np.zeros(4, np.float32), KEY, [2, 3])


def test_fingerprint_same_key_and_preset_agree():
    a, b = fingerprint(_net(), KEY), fingerprint(_net(), KEY)

    assert len(a) == 32 and a == b


def test_fingerprint_differs_with_key_gamma_weights_or_architecture():
    base = fingerprint(_net(), KEY)
    wider = _Net()
    wider.fc = nn.Linear(3, 5)
    hash_model(wider, KEY, 0.5)
    trained = _net()
    with torch.no_grad():
        trained.bn.weight.add_(0.1)

    others = [
        fingerprint(_net(key=OTHER_KEY), OTHER_KEY),
        fingerprint(_net(), OTHER_KEY),
        fingerprint(_net(gamma=0.25), KEY),
        fingerprint(_net(seed=1), KEY),
        fingerprint(wider, KEY),
        fingerprint(trained, KEY),
    ]

    assert all(f != base for f in others)
    assert len(set(others)) == len(others)


def test_running_statistics_travel_scaled_and_come_back_exactly():
    net = copy.deepcopy(_net())  # _net is cached: leave its statistics alone
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.3, -7.1]))
    state = export_state(net)
    assert torch.equal(state[-2], torch.tensor([0.3, -7.1]) * STAT_SCALE)

    other = _net(seed=1)
    load_state(other, state)
    assert torch.equal(other.bn.running_mean, net.bn.running_mean)  # a power of two: exact
    assert torch.equal(other.bn.running_var, net.bn.running_var)


def test_a_negative_running_variance_loads_as_zero():
    net = copy.deepcopy(_net())
    state = export_state(net)
    state[-1] = torch.tensor([-0.5, 2.0]) * STAT_SCALE  # what a rounded quantized increment can leave
    load_state(net, state)
    assert torch.equal(net.bn.running_var, torch.tensor([0.0, 2.0]))


def test_running_statistics_are_packed_last_and_shuffled_among_themselves():
    net = _net()
    stats = statistics_length(net)
    assert stats == 4  # running_mean and running_var of a 2-channel BN
    exported = torch.cat(export_state(net)).numpy()
    packed = pack_model(net, KEY)
    assert sorted(packed[-stats:].tolist()) == sorted(exported[-stats:].tolist())
    assert sorted(packed[:-stats].tolist()) == sorted(exported[:-stats].tolist())

    other = copy.deepcopy(_net(seed=1))
    load_packed(other, packed, KEY)
    assert np.array_equal(pack_model(other, KEY), packed)
    # The same values packed without the split are another permutation: the layouts differ.
    assert not np.array_equal(pack_state(export_state(net), KEY), packed)
    with pytest.raises(ValueError, match="statistics"):
        pack_state(export_state(net), KEY, statistics=exported.size + 1)
