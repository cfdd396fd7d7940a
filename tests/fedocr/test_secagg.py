"""Secure aggregation's building blocks: masks cancel, dropouts unmask, shares rebuild, bad input is named."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedocr import secagg as S
from fedocr import shamir

ROUND = 7
SEED = bytes(range(32))
P = shamir.FIELD_PRIME


def ids(n: int) -> list[str]:
    return [f"edge-{i}" for i in range(n)]


def total_of(uploads) -> np.ndarray:
    return np.sum(np.stack(list(uploads)), axis=0, dtype=np.uint32)  # wraps: the sum mod 2^32


def mask_seed(keys, u: str, v: str) -> bytes:
    return S.agree(keys[u].private, keys[v].public, S.pair_info("mask", ROUND, u, v))


# --- masks ---------------------------------------------------------------------------------------


def test_expand_mask_is_the_chacha20_keystream_little_endian():
    # RFC 8439's all-zero key and nonce: the keystream starts 76 b8 e0 ad a0 f1 3d 90.
    assert S.expand_mask(bytes(32), 2).tolist() == [0xADE0B876, 0x903DF1A0]
    mask = S.expand_mask(SEED, 10)
    assert mask.dtype == np.uint32 and mask.shape == (10,)
    assert np.array_equal(S.expand_mask(SEED, 4), mask[:4])
    assert not np.array_equal(S.expand_mask(bytes(31) + b"\1", 10), mask)
    assert S.expand_mask(SEED, 0).shape == (0,)


def test_expand_mask_refuses_seeds_that_are_not_32_bytes():
    with pytest.raises(S.BadKey, match="mask seed must be 32 bytes, got 16"):
        S.expand_mask(bytes(16), 4)


def test_a_pairs_masks_cancel():
    a = S.pairwise_mask(SEED, "edge-a", "edge-b", 64)
    b = S.pairwise_mask(SEED, "edge-b", "edge-a", 64)
    assert np.array_equal(a, S.expand_mask(SEED, 64))
    assert not (a + b).any()


@pytest.mark.parametrize("n, k", [(3, 2), (4, 2), (5, 2), (6, 4), (6, 5)])
def test_masked_sums_cancel_exactly(n, k):
    edges = ids(n)
    graph = S.neighbours(edges, k, SEED)
    keys = {u: S.generate_keypair() for u in edges}
    self_seeds = {u: bytes([i]) * 32 for i, u in enumerate(edges)}
    rng = np.random.default_rng(n)
    encoded = {u: rng.integers(0, 2**32, 16, dtype=np.uint32) for u in edges}

    uploads = [
        S.mask_upload(encoded[u], u, self_seeds[u], {v: mask_seed(keys, u, v) for v in graph[u]})
        for u in edges
    ]
    unmasked = S.remove_masks(total_of(uploads), self_seeds.values(), [])

    assert np.array_equal(unmasked, total_of(encoded.values()))
    assert not any(np.array_equal(up, encoded[u]) for up, u in zip(uploads, edges, strict=True))


def test_masks_look_uniform():
    zeros = np.zeros(2**16, dtype=np.uint32)
    pair_seeds = {"edge-1": bytes([1]) * 32, "edge-2": bytes([2]) * 32}

    def chi_square(values: np.ndarray) -> float:
        counts = np.bincount(values.view(np.uint8), minlength=256)
        expected = values.nbytes / 256
        return float(((counts - expected) ** 2 / expected).sum())

    masked = S.mask_upload(zeros, "edge-0", bytes([9]) * 32, pair_seeds)
    # 255 degrees of freedom: mean 255, sd 22.6; 400 is more than 6 sd out, and the seeds are fixed.
    assert chi_square(masked) < 400
    assert chi_square(S.encode_fixed(np.full(2**16, 0.3, np.float32), 5, 1.0, 16)) > 10**5


def test_a_dropped_edges_masks_are_removed_with_its_rebuilt_key():
    # Setup: 6 edges, 4 neighbours each, threshold 3; edge-2 shares its secrets, then drops.
    edges, k, t, dropped = ids(6), 4, 3, "edge-2"
    index = {u: i + 1 for i, u in enumerate(edges)}
    graph = S.neighbours(edges, k, SEED)
    c_keys = {u: S.generate_keypair() for u in edges}  # to seal shares
    s_keys = {u: S.generate_keypair() for u in edges}  # to agree on masks
    self_seeds = {u: bytes([40 + i]) * 32 for i, u in enumerate(edges)}
    weights = {u: float(10 + i) for i, u in enumerate(edges)}
    rng = np.random.default_rng(0)
    values = {u: rng.uniform(-1, 1, 8).astype(np.float32) for u in edges}
    clip, frac_bits = 1.0, 16

    def seal_key(me: str, peer: str) -> bytes:
        return S.agree(c_keys[me].private, c_keys[peer].public, S.pair_info("seal", ROUND, me, peer))

    inbox, commitments = {}, {}  # (dealer, holder) -> sealed b share + s share, their commitments
    for u in edges:
        holders = [index[v] for v in sorted(graph[u])]
        b_shares = shamir.split(self_seeds[u], t, holders, rng=random.Random(index[u]))
        s_shares = shamir.split(s_keys[u].private_bytes(), t, holders, rng=random.Random(-index[u]))
        for v in graph[u]:
            b, s = b_shares[index[v]], s_shares[index[v]]
            commitments[u, v] = S.commit_share(u, v, ROUND, b), S.commit_share(u, v, ROUND, s)
            inbox[u, v] = S.seal(seal_key(u, v), b + s, S.share_aad(ROUND, u, v))
    survivors = [u for u in edges if u != dropped]
    uploads = [
        S.mask_upload(
            S.encode_fixed(values[u], weights[u], clip, frac_bits),
            u,
            self_seeds[u],
            {v: mask_seed(s_keys, u, v) for v in graph[u]},
        )
        for u in survivors
    ]

    # Act: survivors open what they hold; for a survivor they reveal b shares, for edge-2 s shares.
    def rebuilt(dealer: str, part: int) -> bytes:
        revealed = {}
        for v in graph[dealer]:
            if v == dropped:
                continue
            plain = S.open_sealed(seal_key(v, dealer), inbox[dealer, v], S.share_aad(ROUND, dealer, v))
            share = plain[part * shamir.SHARE_BYTES : (part + 1) * shamir.SHARE_BYTES]
            S.check_share(dealer, v, ROUND, share, commitments[dealer, v][part])
            revealed[index[v]] = share
        return shamir.combine(revealed, t)

    b_rebuilt = [rebuilt(u, 0) for u in survivors]
    s_dropped = S.KeyPair.from_private_bytes(rebuilt(dropped, 1))
    dangling = [
        (v, dropped, S.agree(s_dropped.private, s_keys[v].public, S.pair_info("mask", ROUND, dropped, v)))
        for v in graph[dropped]
    ]
    total = total_of(uploads)
    unmasked = S.remove_masks(total, b_rebuilt, dangling)

    # Check: the survivors' encoded sum, and their weighted mean within the stated bound.
    assert s_dropped.public == s_keys[dropped].public
    expected = total_of([S.encode_fixed(values[u], weights[u], clip, frac_bits) for u in survivors])
    assert np.array_equal(unmasked, expected)
    assert not np.array_equal(S.remove_masks(total, b_rebuilt, []), expected)
    w = sum(weights[u] for u in survivors)
    mean = sum(weights[u] * values[u].astype(np.float64) for u in survivors) / w
    bound = len(survivors) * 0.5 / (2**frac_bits * w) + 2**-23 * np.abs(mean)
    assert (np.abs(S.decode_fixed(unmasked, w, frac_bits) - mean) <= bound).all()


# --- fixed point ---------------------------------------------------------------------------------


def test_encode_fixed_clips_scales_rounds_and_wraps():
    encoded = S.encode_fixed(np.array([0.5, -0.25, 2.0, -3.0, 0.01], np.float32), 2, 1.0, 4)
    # 0.5·2·16 = 16; -0.25·2·16 = -8 -> 2^32 - 8; 2.0 and -3.0 clip to ±1 -> ±32; 0.32 -> 0
    assert encoded.dtype == np.uint32
    assert encoded.tolist() == [16, 2**32 - 8, 32, 2**32 - 32, 0]


def test_stochastic_rounding_keeps_what_rounding_to_nearest_loses():
    # 0.3 of the last fraction bit: to nearest it is always 0; stochastic, it is 0 or 1 and 0.3 on average.
    x = np.full(200_000, 0.3 * 2.0**-8, np.float32)
    assert not S.encode_fixed(x, 1, 8.0, 8).any()
    got = S.encode_fixed(x, 1, 8.0, 8, np.random.default_rng(0))
    assert set(np.unique(got).tolist()) == {0, 1}
    mean = S.decode_fixed(np.array([got.astype(np.int64).sum() % 2**32], np.uint32), len(x), 8)[0]
    assert abs(mean - 0.3 * 2.0**-8) < 4 * np.sqrt(0.21 / len(x)) * 2.0**-8  # four standard errors
    # Negative values round down or up around the exact product too (two's complement).
    neg = S.encode_fixed(np.array([-0.5 * 2.0**-8] * 1000, np.float32), 1, 8.0, 8, np.random.default_rng(1))
    assert set(neg.view(np.int32).tolist()) == {-1, 0}


def test_decode_fixed_reads_the_sum_as_signed_and_divides_by_weight():
    a = S.encode_fixed(np.array([0.5, -1.0], np.float32), 1, 1.0, 8)
    b = S.encode_fixed(np.array([-0.25, 0.5], np.float32), 3, 1.0, 8)
    # (1·0.5 + 3·-0.25) / 4 = -0.0625; (1·-1 + 3·0.5) / 4 = 0.125
    assert S.decode_fixed(a + b, 4, 8).tolist() == [-0.0625, 0.125]


@st.composite
def fixed_point_cases(draw):
    n = draw(st.integers(1, 6))
    length = draw(st.integers(1, 8))
    clip = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    weights = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    floats = st.floats(-4, 4, width=32, allow_subnormal=True)
    values = draw(st.lists(st.lists(floats, min_size=length, max_size=length), min_size=n, max_size=n))
    most = min(24, math.floor(math.log2((2**31 / sum(weights) - 0.5) / clip)))
    return weights, values, clip, draw(st.integers(0, most))


@settings(max_examples=100, deadline=None, database=None)
@given(fixed_point_cases())
def test_decoded_mean_is_within_the_stated_bound(case):
    weights, values, clip, frac_bits = case
    S.check_headroom(sum(weights), clip, frac_bits)
    arrays = [np.array(v, np.float32) for v in values]

    total = total_of([S.encode_fixed(x, w, clip, frac_bits) for x, w in zip(arrays, weights, strict=True)])
    decoded = S.decode_fixed(total, sum(weights), frac_bits)

    n, w_sum = len(weights), sum(weights)
    for i in range(len(values[0])):
        clipped = [Fraction(min(max(float(x[i]), -clip), clip)) for x in arrays]
        exact = sum(w * c for w, c in zip(weights, clipped, strict=True)) / w_sum
        rounding = Fraction(n, 2 ** (frac_bits + 1) * w_sum)
        bound = rounding + abs(exact) * Fraction(1, 2**23) + Fraction(2.0**-149)  # + one float32 subnormal
        assert abs(Fraction(float(decoded[i])) - exact) <= bound


def test_the_rounding_bound_is_attained():
    # 4 edges of weight 1 send 1.5 / 2^3: each rounds (half to even) to 2 units, half a unit too many.
    x = np.array([1.5 / 8], np.float32)
    total = total_of([S.encode_fixed(x, 1, 1.0, 3)] * 4)
    assert S.decode_fixed(total, 4, 3).tolist() == [0.25]  # 0.1875 + 4·½ / (2^3·4)


def test_headroom_is_refused_where_the_sum_could_wrap():
    # clip·2^16 + ½ = 65536.5 per unit of weight: 32767 fits below 2^31, 32768 does not.
    S.check_headroom(32767, 1.0, 16)
    with pytest.raises(S.SecAggError, match="could reach .* >= 2\\*\\*31 and wrap"):
        S.check_headroom(32768, 1.0, 16)
    with pytest.raises(S.SecAggError, match="could reach"):
        S.encode_fixed(np.zeros(2, np.float32), 2**20, 1.0, 16)
    with pytest.raises(S.SecAggError, match="at least 1"):
        S.encode_fixed(np.zeros(2, np.float32), 0.5, 1.0, 16)


def test_a_sum_at_the_headroom_limit_does_not_wrap():
    weights = [16383, 16384]  # sum 32767, the largest allowed for clip 1 and 16 bits
    full = np.array([1.0, -1.0], np.float32)
    total = total_of([S.encode_fixed(full, w, 1.0, 16) for w in weights])
    assert S.decode_fixed(total, sum(weights), 16).tolist() == [1.0, -1.0]


# --- Shamir --------------------------------------------------------------------------------------


def test_any_threshold_subset_rebuilds_the_secret():
    secret = bytes(range(100, 132))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5], rng=random.Random(0))
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    for size in (3, 4, 5):
        for subset in itertools.combinations(shares, size):
            assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    assert shamir.combine(shamir.split(secret, 1, [9]), 1) == secret


def test_fewer_than_threshold_shares_are_refused():
    shares = shamir.split(SEED, 3, [1, 2, 3, 4], rng=random.Random(0))
    with pytest.raises(S.NotEnoughShares, match="2 shares given, 3 needed"):
        shamir.combine({1: shares[1], 4: shares[4]}, 3)


def test_malformed_shares_are_refused():
    shares = shamir.split(SEED, 2, [1, 2, 3], rng=random.Random(0))
    with pytest.raises(S.BadShare, match="is 65 bytes, expected 66"):
        shamir.combine({1: shares[1], 2: shares[2][1:]}, 2)
    with pytest.raises(S.BadShare, match="not a field element"):
        shamir.combine({1: shares[1], 2: P.to_bytes(shamir.SHARE_BYTES, "big")}, 2)
    with pytest.raises(S.BadShare, match="x coordinate"):
        shamir.combine({0: shares[1], 2: shares[2]}, 2)
    with pytest.raises(S.SecAggError, match="distinct"):
        shamir.split(SEED, 2, [1, 2, 2])
    with pytest.raises(S.SecAggError, match="threshold must be in"):
        shamir.split(SEED, 4, [1, 2, 3])


def test_shares_of_two_secrets_rebuild_no_secret():
    a = shamir.split(SEED, 2, [1, 2], rng=random.Random(0))
    b = shamir.split(bytes(32), 2, [1, 2], rng=random.Random(1))
    with pytest.raises(S.BadShare, match="not a 32-byte secret"):
        shamir.combine({1: a[1], 2: b[2]}, 2)


def test_a_wrong_share_gives_a_wrong_secret_and_its_commitment_names_it():
    secret = bytes(31) + b"\x10"
    shares = shamir.split(secret, 3, [1, 2, 3, 4], rng=random.Random(0))
    commitment = S.commit_share("edge-0", "edge-1", ROUND, shares[1])
    # Shift share 1 by the inverse of its Lagrange weight at 0 among x = 1, 2, 3 (2·3 / (1·2) = 3),
    # so the rebuilt value is secret + 1: a valid-looking 32-byte secret, only the commitment tells.
    wrong = ((int.from_bytes(shares[1], "big") + pow(3, -1, P)) % P).to_bytes(shamir.SHARE_BYTES, "big")

    rebuilt = shamir.combine({1: wrong, 2: shares[2], 3: shares[3]}, 3)

    assert rebuilt == bytes(31) + b"\x11"
    S.check_share("edge-0", "edge-1", ROUND, shares[1], commitment)
    with pytest.raises(S.BadShare, match="share from edge-0 held by edge-1 .* round 7") as caught:
        S.check_share("edge-0", "edge-1", ROUND, wrong, commitment)
    assert (caught.value.dealer, caught.value.holder, caught.value.round_id) == ("edge-0", "edge-1", ROUND)


def test_a_commitment_from_another_round_or_pair_is_refused():
    share = shamir.split(SEED, 2, [1, 2], rng=random.Random(0))[1]
    commitment = S.commit_share("edge-0", "edge-1", ROUND - 1, share)
    with pytest.raises(S.BadShare, match="round 7"):
        S.check_share("edge-0", "edge-1", ROUND, share, commitment)
    with pytest.raises(S.BadShare):
        S.check_share("edge-1", "edge-0", ROUND - 1, share, commitment)


# --- sealing and key agreement -------------------------------------------------------------------


def test_seal_round_trip_and_every_tampering_is_refused():
    key, aad = bytes([5]) * 32, S.share_aad(ROUND, "edge-0", "edge-1")
    sealed = S.seal(key, b"a share", aad)
    assert S.open_sealed(key, sealed, aad) == b"a share"
    assert S.seal(key, b"a share", aad) != sealed  # a fresh nonce each time
    for i in (0, S.NONCE_BYTES, len(sealed) - 1):  # nonce, body, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises(S.BadCiphertext, match="failed authentication"):
            S.open_sealed(key, bytes(tampered), aad)
    for other in (S.share_aad(ROUND, "edge-1", "edge-0"), S.share_aad(ROUND + 1, "edge-0", "edge-1")):
        with pytest.raises(S.BadCiphertext):
            S.open_sealed(key, sealed, other)
    with pytest.raises(S.BadCiphertext):
        S.open_sealed(bytes([6]) * 32, sealed, aad)
    with pytest.raises(S.BadCiphertext, match="shorter than nonce and tag"):
        S.open_sealed(key, sealed[:27], aad)
    with pytest.raises(S.BadKey, match="sealing key must be 32 bytes"):
        S.seal(key[:16], b"x", aad)


def test_agree_gives_both_sides_one_key_bound_to_info():
    a, b = S.generate_keypair(), S.generate_keypair()
    info = S.pair_info("mask", ROUND, "edge-0", "edge-1")
    assert info == S.pair_info("mask", ROUND, "edge-1", "edge-0")
    key = S.agree(a.private, b.public, info)
    assert len(key) == 32 and key == S.agree(b.private, a.public, info)
    assert key != S.agree(a.private, b.public, S.pair_info("mask", ROUND + 1, "edge-0", "edge-1"))
    assert key != S.agree(a.private, b.public, S.pair_info("seal", ROUND, "edge-0", "edge-1"))
    assert S.KeyPair.from_private_bytes(a.private_bytes()).public == a.public


@pytest.mark.parametrize(
    "public",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    ],
)
def test_agree_refuses_low_order_public_keys(public):
    with pytest.raises(S.BadKey, match="low-order point"):
        S.agree(S.generate_keypair().private, public, b"info")


def test_agree_refuses_public_keys_of_the_wrong_length():
    with pytest.raises(S.BadKey, match="peer public key must be 32 bytes, got 31"):
        S.agree(S.generate_keypair().private, bytes(range(1, 32)), b"info")


# --- neighbour graph -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 6, 18])
def test_neighbour_graph_is_symmetric_and_k_regular(k):
    graph = S.neighbours(ids(20), k, SEED)
    assert set(graph) == set(ids(20))
    for u, near in graph.items():
        assert len(near) == k and u not in near
        assert all(u in graph[v] for v in near)


def test_neighbour_graph_depends_on_the_round_seed_only():
    edges = ids(30)
    graph = S.neighbours(edges, 4, SEED)
    assert S.neighbours(list(reversed(edges)), 4, SEED) == graph
    assert S.neighbours(edges, 4, bytes(32)) != graph


def test_neighbour_graph_is_complete_from_k_of_n_minus_1_and_refuses_bad_k():
    assert S.neighbours(ids(5), 4, SEED)["edge-0"] == frozenset(ids(5)[1:])
    assert S.neighbours(ids(5), 9, SEED) == S.neighbours(ids(5), 4, SEED)
    with pytest.raises(S.SecAggError, match="k must be even"):
        S.neighbours(ids(10), 3, SEED)
    with pytest.raises(S.SecAggError, match="distinct"):
        S.neighbours(["a", "a", "b"], 2, SEED)


def test_neighbour_count_rule():
    # least even k with C(n,2)·0.1^k <= 2^-40, capped at n - 1
    assert [S.neighbour_count(n) for n in (2, 3, 10, 50, 200, 10**6)] == [1, 2, 9, 16, 18, 24]
    assert S.neighbour_count(200, dropout=0.0) == 2
    assert S.neighbour_count(200, dropout=0.3) == 32
    k = S.neighbour_count(200)
    assert math.comb(200, 2) * 0.1**k <= 2**-40 < math.comb(200, 2) * 0.1 ** (k - 2)
