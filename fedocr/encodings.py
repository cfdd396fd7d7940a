"""Value encodings of one chunk payload: float32, float16, and 8-, 4-, 3- and 2-bit block quantization.

A chunk holds ``count`` consecutive values of one tensor. Its payload (before compression) is:

- ENCODING_FLOAT32: ``count`` little-endian binary32 values;
- ENCODING_FLOAT16: ``count`` little-endian binary16 values;
- ENCODING_FLOAT64: ``count`` little-endian binary64 values (a leaf aggregator's weighted sum,
  forwarded to the root; exact tensors too);
- ENCODING_INT8_QUANTIZED: the values in blocks of BLOCK (the last one may be shorter); first one
  little-endian binary32 scale per block, then ``count`` signed bytes q in [-127, 127]; value =
  q * scale of its block;
- ENCODING_MASKED_INT (secure aggregation): ``count`` little-endian uint32 values, fixed-point
  increments plus masks mod 2^32 (fedocr.secagg); every tensor, exact ones included, and they
  decode to uint32, not float32;
- ENCODING_MASKED_INT16, ENCODING_MASKED_INT8 (secure aggregation with b-bit codes): ``count``
  little-endian uint16 or uint8 values, codes plus masks mod 2^16 or 2^8; they decode to uint32
  (zero-extended), so a uint32 sum of them holds their sum mod 2^16 or 2^8 in its low bits;
- ENCODING_INT4_QUANTIZED, ENCODING_INT3_QUANTIZED, ENCODING_INT2_QUANTIZED: the same scales,
  then ``ceil(count * b / 8)`` bytes of b-bit codes (b = 4, 3, 2) as one little-endian bit
  stream: value i's code is bits b*i .. b*i + b - 1, lowest first, and the bits after the last
  code must be 0. A code u in [1, 2^b - 1] means q = u - 2^(b-1): q in [-7, 7], [-3, 3] or
  {-1, 0, 1} (ternary); code 0 is invalid. In int4 value 2k is byte k's low nibble.

A scale must be finite and in [0, MAX_SCALE] (so that every decoded value is a finite float32).
In int8, int4 and int3 the encoder picks scale = max |value| / qmax per block, so a block's
largest value is exact. In int2 it picks the block's mean |value|: with the max, nearly every
value of a block would round to 0. Rounding is to the nearest level, or stochastic with an rng
(unbiased, E[decoded] = value, for every value within qmax * scale: all of them but in int2).
Rounding "fit" is to the nearest level with each block's scale chosen, among the max rule's scale
and FIT_FRACTIONS of it, to leave the least squared error: it clips a block's few largest values
so that its many small ones get levels of their own, and is meant for senders with error
feedback, which carries what the clipping dropped into the next message (int2 keeps its mean
rule and rounds to the nearest level). The receiver decodes every rule the same way.
"""

from __future__ import annotations

import numpy as np

from fedocr.errors import WireFormatError
from fedocr.v1 import federation_pb2 as pb

BLOCK = 256  # values per quantization scale
FLOAT32 = np.dtype("<f4")
FLOAT16 = np.dtype("<f2")
FLOAT64 = np.dtype("<f8")
MASKED = np.dtype("<u4")
# The masked encodings and the little-endian unsigned type of their values (a value's width in bits
# is 8 * itemsize: the modulus of its masks).
MASKED_DTYPES = {
    pb.ENCODING_MASKED_INT: MASKED,
    pb.ENCODING_MASKED_INT16: np.dtype("<u2"),
    pb.ENCODING_MASKED_INT8: np.dtype("u1"),
}
# A masked value's width in bits -> the encoding that carries it.
MASKED_BY_WIDTH = {8 * dtype.itemsize: encoding for encoding, dtype in MASKED_DTYPES.items()}
FLOAT16_MAX = float(np.finfo(np.float16).max)
QMAX = {
    pb.ENCODING_INT8_QUANTIZED: 127,
    pb.ENCODING_INT4_QUANTIZED: 7,
    pb.ENCODING_INT3_QUANTIZED: 3,
    pb.ENCODING_INT2_QUANTIZED: 1,
}
# Bits per code of the bit-packed encodings.
BITS = {pb.ENCODING_INT4_QUANTIZED: 4, pb.ENCODING_INT3_QUANTIZED: 3, pb.ENCODING_INT2_QUANTIZED: 2}
MAX_SCALE = float(np.finfo(np.float32).max) / 128  # q * scale stays finite for |q| <= 127
ROUNDINGS = ("nearest", "stochastic", "fit")
# The fractions of the max rule's scale that rounding "fit" tries in each block besides the max rule's.
FIT_FRACTIONS = (0.8, 0.65, 0.5, 0.4, 0.3, 0.22)

# Names used in configuration files and on the command line.
NAMES: dict[str, int] = {
    "float32": pb.ENCODING_FLOAT32,
    "float16": pb.ENCODING_FLOAT16,
    "int8": pb.ENCODING_INT8_QUANTIZED,
    "int4": pb.ENCODING_INT4_QUANTIZED,
    "int3": pb.ENCODING_INT3_QUANTIZED,
    "int2": pb.ENCODING_INT2_QUANTIZED,
}


class EncodingError(WireFormatError):
    """A payload that is not a valid encoding of its values, or values this encoding cannot hold."""


class BadScale(EncodingError):
    """A quantized chunk with a NaN, infinite, negative or too large block scale."""


class BadCode(EncodingError):
    """A quantized code outside its range (-128 in int8, code 0 or set padding bits in int4, int3, int2)."""


class PayloadSizeError(EncodingError):
    """A payload whose size does not match its value count (a block or a byte too many or few)."""


def name_of(encoding: int) -> str:
    """The short name of an Encoding value ("int8"), or its number when unknown."""
    for name, value in NAMES.items():
        if value == encoding:
            return name
    return pb.Encoding.Name(encoding) if encoding in pb.Encoding.values() else str(encoding)


def is_lossy(encoding: int) -> bool:
    """Whether decoding loses precision against float32 (so error feedback has work to do)."""
    return encoding not in (pb.ENCODING_FLOAT32, pb.ENCODING_FLOAT64)


def blocks(count: int) -> int:
    """The number of scale blocks of a chunk of ``count`` values."""
    return -(-count // BLOCK)


def payload_size(encoding: int, count: int) -> int:
    """Bytes of the uncompressed payload of ``count`` values."""
    if encoding == pb.ENCODING_FLOAT32:
        return 4 * count
    if encoding == pb.ENCODING_FLOAT64:
        return 8 * count
    if encoding in MASKED_DTYPES:
        return MASKED_DTYPES[encoding].itemsize * count
    if encoding == pb.ENCODING_FLOAT16:
        return 2 * count
    if encoding == pb.ENCODING_INT8_QUANTIZED:
        return 4 * blocks(count) + count
    if encoding in BITS:
        return 4 * blocks(count) + -(-count * BITS[encoding] // 8)
    raise EncodingError(f"encoding {name_of(encoding)} has no payload layout")


def encode(
    values: np.ndarray, encoding: int, rounding: str = "nearest", rng: np.random.Generator | None = None
) -> tuple[bytes, np.ndarray]:
    """Encode float32 ``values`` (1-D); returns the payload and the values it decodes to.

    Float16 saturates finite values at its largest. ``rounding="stochastic"`` needs ``rng``.
    """
    if encoding in MASKED_DTYPES:
        masked = np.ascontiguousarray(values).reshape(-1)
        if masked.dtype != np.uint32:
            raise EncodingError(f"masked values must be uint32, got {masked.dtype}")
        dtype = MASKED_DTYPES[encoding]
        if dtype.itemsize < 4 and (masked >> (8 * dtype.itemsize)).any():
            raise EncodingError(f"masked values exceed {8 * dtype.itemsize} bits for {name_of(encoding)}")
        return masked.astype(dtype).tobytes(), masked
    if encoding == pb.ENCODING_FLOAT64:
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        return values.astype(FLOAT64).tobytes(), values
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if encoding == pb.ENCODING_FLOAT32:
        return values.astype(FLOAT32).tobytes(), values
    if encoding == pb.ENCODING_FLOAT16:
        # Large finite values saturate; NaN and infinity pass through for the receiver to refuse.
        half = np.where(np.isinf(values), values, np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)).astype(FLOAT16)
        return half.tobytes(), half.astype(np.float32)
    if encoding not in QMAX:
        raise EncodingError(f"encoding {name_of(encoding)} cannot be encoded here")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if rounding == "stochastic" and rng is None:
        raise ValueError("stochastic rounding needs an rng")
    qmax = QMAX[encoding]
    n = values.size
    padded = np.zeros(blocks(n) * BLOCK, dtype=np.float32)
    padded[:n] = values
    grid = padded.reshape(-1, BLOCK)
    if encoding == pb.ENCODING_INT2_QUANTIZED:  # the mean |value| of each block's real values
        sizes = np.minimum(BLOCK, n - BLOCK * np.arange(grid.shape[0]))
        with np.errstate(invalid="ignore", over="ignore"):
            peaks = np.abs(grid).sum(axis=1, dtype=np.float64) / sizes
    else:
        peaks = np.abs(grid).max(axis=1) / qmax
        if rounding == "fit":
            peaks = _fitted_scales(grid, peaks, qmax)
    # Non-finite values give a non-finite scale, which the receiver refuses: nothing is hidden.
    scales = np.where(np.isfinite(peaks), np.minimum(peaks, MAX_SCALE), peaks).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: refused by the receiver
        scaled = grid / safe
        if rounding != "stochastic":
            q = np.rint(scaled)
        else:
            q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
        q = np.clip(np.nan_to_num(q), -qmax, qmax).astype(np.int8)
        decoded = (q.astype(np.float32) * scales[:, None]).reshape(-1)[:n]
    codes = q.reshape(-1)[:n]
    head = scales.astype(FLOAT32).tobytes()
    if encoding == pb.ENCODING_INT8_QUANTIZED:
        return head + codes.tobytes(), decoded
    return head + _pack(codes, encoding), decoded


def _fitted_scales(grid: np.ndarray, peaks: np.ndarray, qmax: int) -> np.ndarray:
    """Per block (row of ``grid``), the scale among ``peaks`` and FIT_FRACTIONS of it whose nearest,
    clipped codes leave the least squared error; ``peaks`` where a block is 0 or not finite."""
    best, best_error = peaks.copy(), np.full(peaks.shape, np.inf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for fraction in (1.0, *FIT_FRACTIONS):
            scale = (peaks * fraction).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float32)[:, None]
            q = np.clip(np.rint(grid / safe), -qmax, qmax)
            error = np.square(q * safe - grid).sum(axis=1, dtype=np.float64)
            better = error < best_error
            best[better], best_error[better] = scale[better], error[better]
    return np.where(np.isfinite(peaks) & (peaks > 0), best, peaks)


def _pack(q: np.ndarray, encoding: int) -> bytes:
    """Codes u = q + qmax + 1 of ``encoding``'s width, bit after bit, lowest bits first; zero bits
    fill the last byte."""
    bits = BITS[encoding]
    u = (q.astype(np.int16) + QMAX[encoding] + 1).astype(np.uint8)
    stream = ((u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def _unpack(body: np.ndarray, encoding: int, count: int, where: str) -> np.ndarray:
    """The q values of ``count`` packed codes; refuses code 0 and set bits after the last value.

    Every ``bits`` bytes hold exactly 8 codes: each group is read as one integer and its codes
    shifted out (a few whole-array operations, where a bit per element costs 10x more).
    """
    bits = BITS[encoding]
    groups = -(-body.size // bits)
    padded = np.zeros(groups * bits, dtype=np.uint32)
    padded[: body.size] = body
    padded = padded.reshape(groups, bits)
    word = padded[:, 0].copy()
    for j in range(1, bits):
        word |= padded[:, j] << np.uint32(8 * j)
    mask = np.uint32((1 << bits) - 1)
    codes = np.empty((groups, 8), dtype=np.uint8)
    for i in range(8):
        codes[:, i] = (word >> np.uint32(bits * i)) & mask
    u = codes.reshape(-1)
    if u[count:].any() or not u[:count].all():
        return _unpack_bits(body, encoding, count, where)  # raises, naming the bit or value
    return u[:count].astype(np.float32) - (QMAX[encoding] + 1)


def _unpack_bits(body: np.ndarray, encoding: int, count: int, where: str) -> np.ndarray:
    """_unpack bit by bit: slower, and names the first bad bit or code."""
    bits = BITS[encoding]
    stream = np.unpackbits(body, bitorder="little")
    unit = "nibble" if bits == 4 else f"{bits}-bit code"
    if stream[count * bits :].any():
        at = count * bits + int(np.flatnonzero(stream[count * bits :])[0])
        raise BadCode(f"{where}: the padding {unit} after value {count - 1} has bit {at - count * bits} set")
    u = (stream[: count * bits].reshape(count, bits) << np.arange(bits, dtype=np.uint8)).sum(axis=1)
    if not u.all():
        at = int(np.flatnonzero(u == 0)[0])
        raise BadCode(f"{where}: {name_of(encoding)} code 0 at value {at}; codes are 1..{2**bits - 1}")
    return u.astype(np.float32) - (QMAX[encoding] + 1)


def decode(
    payload: bytes, encoding: int, count: int, where: str = "payload", copy: bool = True
) -> np.ndarray:
    """The float32 values of a payload of ``count`` values (float64 for ENCODING_FLOAT64, uint32 for
    the masked encodings); raises an EncodingError naming ``where``. ``copy=False``: values sent
    as they are held may come back as a read-only view of ``payload``."""
    size = payload_size(encoding, count)
    if len(payload) != size:
        detail = ""
        if encoding in QMAX:
            detail = f" ({blocks(count)} scale blocks of {BLOCK} values and the codes)"
        raise PayloadSizeError(
            f"{where} has {len(payload)} payload bytes for {count} values; expected {size}{detail}"
        )
    if encoding == pb.ENCODING_FLOAT32:
        return np.frombuffer(payload, dtype=FLOAT32).astype(np.float32, copy=copy)
    if encoding == pb.ENCODING_FLOAT64:
        return np.frombuffer(payload, dtype=FLOAT64).astype(np.float64, copy=copy)
    if encoding in MASKED_DTYPES:
        return np.frombuffer(payload, dtype=MASKED_DTYPES[encoding]).astype(np.uint32, copy=copy)
    if encoding == pb.ENCODING_FLOAT16:
        return np.frombuffer(payload, dtype=FLOAT16).astype(np.float32)
    nblocks = blocks(count)
    scales = np.frombuffer(payload, dtype=FLOAT32, count=nblocks).astype(np.float32)
    bad = ~(np.isfinite(scales) & (scales >= 0) & (scales <= MAX_SCALE))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise BadScale(
            f"{where}: scale of block {k} is {float(scales[k])!r}; "
            f"scales must be finite and in [0, {MAX_SCALE:.3g}]"
        )
    body = np.frombuffer(payload, dtype=np.uint8, offset=4 * nblocks)
    if encoding == pb.ENCODING_INT8_QUANTIZED:
        q = body.view(np.int8)
        if (q == -128).any():
            at = int(np.flatnonzero(q == -128)[0])
            raise BadCode(f"{where}: int8 code -128 at value {at}; codes are -127..127")
        q = q.astype(np.float32)
    else:
        q = _unpack(body, encoding, count, where)
    padded = np.zeros(nblocks * BLOCK, dtype=np.float32)
    padded[:count] = q
    return (padded.reshape(-1, BLOCK) * scales[:, None]).reshape(-1)[:count]
