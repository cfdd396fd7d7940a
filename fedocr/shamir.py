"""Shamir secret sharing over the prime field GF(2^521 - 1): 32-byte secrets, SHARE_BYTES-byte shares.

Secure aggregation (fedocr.secagg) shares each edge's self-mask seed and mask private key among
its neighbours with ``split``, and the aggregator rebuilds the ones it needs with ``combine``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Protocol

from fedocr.secagg import KEY_BYTES, BadShare, NotEnoughShares, SecAggError, key_bytes

FIELD_PRIME = 2**521 - 1  # a Mersenne prime: well above 2^256, so a 32-byte secret is one element
SHARE_BYTES = (FIELD_PRIME.bit_length() + 7) // 8  # 66, big-endian


class RandomSource(Protocol):
    """Where ``split`` draws its coefficients: ``secrets.SystemRandom``, or a seeded Random in tests."""

    def randrange(self, stop: int) -> int: ...


def _check_x(x: object) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < FIELD_PRIME:
        raise BadShare(f"share x coordinate must be an integer in [1, 2**521 - 1), got {x!r}")
    return x


def split(
    secret: bytes, threshold: int, holders: Sequence[int], rng: RandomSource | None = None
) -> dict[int, bytes]:
    """Shamir shares of a 32-byte secret: any ``threshold`` of them rebuild it, fewer reveal nothing.

    ``holders`` are the holders' distinct positive indices (the x coordinates). Each share is the
    polynomial's value at x, ``SHARE_BYTES`` big-endian. ``rng`` defaults to ``secrets``; pass a
    seeded ``random.Random`` only in tests.
    """
    value = int.from_bytes(key_bytes(secret, "secret"), "big")
    xs = [_check_x(x) for x in holders]
    if len(set(xs)) != len(xs):
        raise SecAggError(f"holder indices must be distinct, got {list(holders)}")
    if not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold must be in [1, {len(xs)}] for {len(xs)} holders, got {threshold!r}")
    rng = rng if rng is not None else secrets.SystemRandom()
    coefficients = [value] + [rng.randrange(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % FIELD_PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Uses the ``threshold`` shares of smallest x; check shares against their commitments first, since
    a wrong share gives a wrong secret (usually refused here as not 32 bytes, but not always).
    """
    if not isinstance(threshold, int) or threshold < 1:
        raise SecAggError(f"threshold must be a positive integer, got {threshold!r}")
    if len(shares) < threshold:
        raise NotEnoughShares(f"{len(shares)} shares given, {threshold} needed")
    points = []
    for x, share in shares.items():
        x = _check_x(x)
        if len(share) != SHARE_BYTES:
            raise BadShare(f"share at x={x} is {len(share)} bytes, expected {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= FIELD_PRIME:
            raise BadShare(f"share at x={x} is not a field element (>= 2**521 - 1)")
        points.append((x, y))
    points = sorted(points)[:threshold]
    value = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % FIELD_PRIME
                den = den * (xm - xj) % FIELD_PRIME
        value = (value + yj * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    if value >= 2 ** (8 * KEY_BYTES):
        raise BadShare(
            f"shares rebuild a {value.bit_length()}-bit value, not a 32-byte secret: "
            "a share is wrong or belongs to another secret"
        )
    return value.to_bytes(KEY_BYTES, "big")
