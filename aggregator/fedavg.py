"""Streaming FedAvg in pure numpy: running weighted sums, the weighted mean and checks on arrays.

The global state, the running sum and each increment are ONE flat vector: the tensors of the
manifest laid end to end in manifest order (`layout`). Algorithm 2 of the paper:
    W_{t+1} = W_t + sum_i w_i * dW_i / sum_i w_i      (w_i = 1 for the paper's uniform mean)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from fedocr.errors import MalformedRequest

# Blocks bound the float64 temporaries of an in-place update to a few MB whatever the model size.
BLOCK = 1 << 16  # 64 Ki values: a 512 KiB float64 scratch stays in cache (2x faster than 1 Mi)

WEIGHTINGS = ("samples", "uniform")
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SAMPLES = 1 << 53  # sample counts above this are not exact as float64 weights


def layout(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Return (offset, length) of each tensor inside the flat vector, in manifest order."""
    out, offset = [], 0
    for n in lengths:
        if n < 0:
            raise MalformedRequest(f"tensor length must be >= 0, got {n}")
        out.append((offset, int(n)))
        offset += int(n)
    return out


def weight_for(samples: int, weighting: str) -> float:
    """The FedAvg weight of one upload: its sample count, or 1 for the uniform mean."""
    if samples > MAX_SAMPLES:
        raise MalformedRequest(
            f"sample_count {samples} is not a count (above 2**53; a negative number sent unsigned?)"
        )
    if weighting == "uniform":
        return 1.0
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    if samples <= 0:
        raise MalformedRequest("sample_count must be > 0 when the federation weights by samples")
    return float(samples)


def sum_weight(weight: int) -> float:
    """The weight of a leaf aggregator's forwarded sum: its sample_count, the sum of its uploads'
    weights (sample counts, or one each for the uniform mean)."""
    if not 0 < weight <= MAX_SAMPLES:
        raise MalformedRequest(
            f"a forwarded sum needs a weight in 1..2**53 as its sample_count, got {weight}"
        )
    return float(weight)


def check_sum_headroom(peak: float, weight: float, state_peak: float) -> None:
    """Raise MalformedRequest unless state + sum / weight surely stays within float32."""
    if state_peak + peak / weight > FLOAT32_MAX:
        raise MalformedRequest("the forwarded sum's mean would take the global state beyond float32")


def check_increment(values: np.ndarray, expected_length: int) -> None:
    """Raise MalformedRequest unless `values` is a 1-D float array of the length with finite values."""
    if values.ndim != 1 or values.shape[0] != expected_length:
        raise MalformedRequest(f"increment has {values.size} values, the manifest says {expected_length}")
    for start in range(0, values.shape[0], BLOCK):
        block = values[start : start + BLOCK]
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block))[0])
            raise MalformedRequest(f"increment holds a non-finite value (NaN or Inf) at element {bad}")


def peak(arrays: Sequence[np.ndarray]) -> float:
    """The largest magnitude in `arrays` (finite values), without a temporary copy."""
    return max((max(float(a.max()), -float(a.min())) for a in arrays if a.size), default=0.0)


def check_headroom(
    state: np.ndarray, increments: Sequence[np.ndarray], peak: float, state_peak: float
) -> None:
    """Raise MalformedRequest unless state + increment stays within float32, element by element.

    A weighted mean lies between its increments, so the aggregated state then stays finite too.
    `peak` and `state_peak` are the largest magnitudes; the element pass runs only when they alone
    cannot rule an overflow out.
    """
    if state_peak + peak <= FLOAT32_MAX:
        return
    offset = 0
    for values in increments:
        for start in range(0, values.size, BLOCK):
            block = values[start : start + BLOCK].astype(np.float64)
            block += state[offset + start : offset + start + block.size]
            if np.abs(block).max() > FLOAT32_MAX:
                at = offset + start + int(np.abs(block).argmax())
                raise MalformedRequest(
                    f"increment would take the global state beyond float32 at element {at}"
                )
        offset += values.size


def _blocks(n: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (slice, float64 scratch of its size) covering 0..n in BLOCK steps, one scratch reused."""
    scratch = np.empty(min(BLOCK, n), dtype=np.float64)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        yield slice(start, stop), scratch[: stop - start]


def accumulate(total: np.ndarray, increment: np.ndarray, weight: float) -> None:
    """total += weight * increment, in place.

    total: float64 (n,), the round's running sum; increment: float32 or float64 (n,).
    """
    if total.shape != increment.shape:
        raise MalformedRequest(f"increment shape {increment.shape} does not match the sum {total.shape}")
    for part, tmp in _blocks(total.shape[0]):
        np.multiply(increment[part], weight, out=tmp, dtype=np.float64)
        total[part] += tmp


def accumulate_tensors(
    total: np.ndarray, arrays: Sequence[np.ndarray], lengths: Sequence[int], weight: float
) -> None:
    """total += weight * each tensor of an upload, at its place in the flat sum (``lengths``: the
    manifest's). The one way an upload enters the sum, live or replayed from the upload log, so
    both give the same float64 sum bit for bit."""
    for (off, n), values in zip(layout(lengths), arrays, strict=True):
        accumulate(total[off : off + n], values, weight)


def apply_mean(state: np.ndarray, total: np.ndarray, weight: float) -> None:
    """state += total / weight, in place (float32 state, float64 sum): the new global state."""
    if weight <= 0:
        raise ValueError("cannot average a round with zero total weight")
    if state.shape != total.shape:
        raise ValueError(f"state shape {state.shape} does not match the sum {total.shape}")
    for part, tmp in _blocks(state.shape[0]):
        np.divide(total[part], weight, out=tmp)
        tmp += state[part]
        state[part] = tmp


def split(flat: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """Views of each tensor inside a flat vector (no copies)."""
    return [flat[off : off + n] for off, n in layout(lengths)]


def concat_into(out: np.ndarray, arrays: Sequence[np.ndarray], lengths: Sequence[int]) -> np.ndarray:
    """Copy per-tensor arrays into the flat vector `out`, checking each length; returns `out`."""
    if len(arrays) != len(lengths):
        raise MalformedRequest(f"upload has {len(arrays)} tensors, the manifest says {len(lengths)}")
    for (off, n), arr in zip(layout(lengths), arrays, strict=True):
        arr = np.asarray(arr).reshape(-1)
        if arr.shape[0] != n:
            raise MalformedRequest(f"tensor at offset {off} has {arr.shape[0]} values, expected {n}")
        out[off : off + n] = arr
    return out
