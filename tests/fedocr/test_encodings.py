"""The quantized and half-precision encodings: round trips, error bounds, sizes and every bad payload."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedocr import encodings as E
from fedocr import tensors as T
from fedocr.v1 import federation_pb2 as pb

F16, I8, I4 = pb.ENCODING_FLOAT16, pb.ENCODING_INT8_QUANTIZED, pb.ENCODING_INT4_QUANTIZED
I3, I2 = pb.ENCODING_INT3_QUANTIZED, pb.ENCODING_INT2_QUANTIZED
NONE, ZSTD = pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD
LOSSY = [F16, I8, I4, I3, I2]


def values(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * rng.uniform(1e-4, 1e-1)).astype(np.float32)


def stream(arrays, encoding, compression=ZSTD, chunk_elems=1000, rounding="nearest"):
    enc = T.ChunkEncoder(arrays, encoding, compression, chunk_elems=chunk_elems, rounding=rounding, seed=3)
    chunks = list(enc.chunks())
    return enc, chunks, enc.trailer()


def assemble(specs, chunks, trailer, encoding, compression=ZSTD):
    asm = T.ChunkAssembler(specs, encoding, compression)
    for chunk in chunks:
        asm.add(chunk)
    return asm.finish(trailer)


@pytest.mark.parametrize("encoding", LOSSY)
@pytest.mark.parametrize("compression", [NONE, ZSTD])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_receiver_decodes_what_the_sender_says_it_will(encoding, compression, rounding):
    # Odd counts and counts off the block grid: partial last blocks and padding codes.
    arrays = [values(2561), values(1, 1), values(257, 2)]
    enc, chunks, trailer = stream(arrays, encoding, compression, rounding=rounding)

    out = assemble([(0, 2561), (1, 1), (2, 257)], chunks, trailer, encoding, compression)

    for got, sent in zip(out, enc.decoded(), strict=True):
        np.testing.assert_array_equal(got, sent)
    assert not np.array_equal(out[0], arrays[0])  # lossy: something was dropped
    if encoding != I2:  # within one quantization step (int2's error is bounded per block below)
        step = float(np.abs(arrays[0]).max()) / E.QMAX.get(encoding, 7)
        np.testing.assert_allclose(out[0], arrays[0], atol=step)


@pytest.mark.parametrize(("encoding", "qmax"), [(I8, 127), (I4, 7), (I3, 3)])
def test_nearest_rounding_error_is_at_most_half_a_step_per_block(encoding, qmax):
    x = values(4096)
    _, decoded = E.encode(x, encoding)

    step = np.abs(x.reshape(-1, E.BLOCK)).max(axis=1) / qmax
    err = np.abs(decoded - x).reshape(-1, E.BLOCK).max(axis=1)
    assert (err <= step / 2 * (1 + 1e-5)).all()
    # The largest value of each block is exact.
    peaks = np.abs(x.reshape(-1, E.BLOCK)).argmax(axis=1)
    rows = np.arange(peaks.size)
    np.testing.assert_allclose(
        decoded.reshape(-1, E.BLOCK)[rows, peaks], x.reshape(-1, E.BLOCK)[rows, peaks], rtol=1e-6
    )


def test_stochastic_rounding_is_unbiased():
    x = np.full(E.BLOCK, 0.3, dtype=np.float32)
    x[0] = 7.0  # scale 1 in int4: 0.3 lies between the levels 0 and 1
    rng = np.random.default_rng(0)
    mean = np.mean([E.encode(x, I4, "stochastic", rng)[1][1:] for _ in range(400)], axis=0)

    assert abs(float(mean.mean()) - 0.3) < 0.01  # nearest rounding would give 0.0
    assert E.encode(x, I4, "nearest")[1][1] == 0.0


@pytest.mark.parametrize("encoding", [I8, I4, I3])
def test_fit_rounding_leaves_no_block_worse_than_the_max_rule_and_the_receiver_reads_it_unchanged(encoding):
    x = (np.random.default_rng(5).standard_t(2, 16 * E.BLOCK) * 1e-3).astype(np.float32)  # heavy tails
    x[:300] = 0.0  # a block of zeros (scale 0) and part of the next
    enc, chunks, trailer = stream([x], encoding, chunk_elems=x.size, rounding="fit")

    (got,) = assemble([(0, x.size)], chunks, trailer, encoding)

    np.testing.assert_array_equal(got, enc.decoded()[0])
    fit = np.square(got - x).reshape(-1, E.BLOCK).sum(axis=1)
    nearest = np.square(E.encode(x, encoding)[1] - x).reshape(-1, E.BLOCK).sum(axis=1)
    assert (fit <= nearest * (1 + 1e-6)).all()
    assert got[:300].tolist() == [0.0] * 300
    if encoding == I3:  # few levels: clipping the tails pays
        assert fit.sum() < 0.9 * nearest.sum()


def test_int2_is_ternary_at_each_blocks_mean_magnitude():
    x = values(1000)  # a short last block: its mean is over its 232 values only
    payload, decoded = E.encode(x, I2)

    blocks = [x[i : i + E.BLOCK] for i in range(0, x.size, E.BLOCK)]
    means = np.array([np.abs(b).mean() for b in blocks], dtype=np.float32)
    np.testing.assert_allclose(np.frombuffer(payload[:16], "<f4"), means, rtol=1e-6)
    scale = np.repeat(means, E.BLOCK)[: x.size]
    q = decoded / scale
    np.testing.assert_allclose(q, np.rint(q), atol=1e-5)
    assert set(np.rint(q).astype(int).tolist()) == {-1, 0, 1}
    # Nearest: a value keeps its sign when it is at least half its block's mean, else it is 0.
    big = np.abs(x) > 0.5001 * scale
    assert (np.sign(decoded[big]) == np.sign(x[big])).all()
    assert not decoded[np.abs(x) < 0.4999 * scale].any()


def test_int2_stochastic_rounding_is_unbiased_within_the_scale():
    x = np.full(E.BLOCK, 0.5, dtype=np.float32)
    x[: E.BLOCK // 2] = 0.1  # block mean 0.3: 0.1 lies between the levels 0 and 0.3
    rng = np.random.default_rng(0)
    mean = np.mean([E.encode(x, I2, "stochastic", rng)[1][: E.BLOCK // 2] for _ in range(400)], axis=0)

    assert abs(float(mean.mean()) - 0.1) < 0.005
    assert E.encode(x, I2, "nearest")[1][0] == 0.0


def test_zeros_encode_to_zero_scales():
    payload, decoded = E.encode(np.zeros(300, dtype=np.float32), I8)

    assert payload[:8] == bytes(8)
    assert not decoded.any()


def test_float16_saturates_instead_of_overflowing():
    _, decoded = E.encode(np.array([1e6, -1e6, 1.0], dtype=np.float32), F16)

    assert decoded.tolist() == [65504.0, -65504.0, 1.0]


@pytest.mark.parametrize(
    ("encoding", "ratio"),
    [(pb.ENCODING_FLOAT32, 1.0), (F16, 0.5), (I8, 0.2539), (I4, 0.1289), (I3, 0.0977), (I2, 0.0664)],
)
def test_payload_sizes(encoding, ratio):
    n = 1 << 16
    payload, _ = E.encode(values(n), encoding)

    assert len(payload) == E.payload_size(encoding, n)
    assert len(payload) / (4 * n) == pytest.approx(ratio, abs=1e-3)


def test_sizes_off_the_byte_and_block_grid():
    assert E.payload_size(I4, 3) == 4 + 2
    assert E.payload_size(I8, 257) == 8 + 257
    assert E.payload_size(I2, 5) == 4 + 2
    assert E.payload_size(I3, 3) == 4 + 2  # 9 bits
    assert E.payload_size(I3, 8) == 4 + 3
    assert E.payload_size(I2, 257) == 8 + 65


# -- bad payloads, as the aggregator would receive them ----------------------------------------


def one_chunk(encoding, n=300, **kw):
    enc, chunks, trailer = stream([values(n)], encoding, NONE, chunk_elems=n)
    return chunks[0], trailer


def refuse(encoding, payload, n=300):
    asm = T.ChunkAssembler([(0, n)], encoding, NONE)
    chunk = pb.TensorChunk(tensor_id=0, offset=0, count=n, payload=payload, seq=0)
    asm.add(chunk)


@pytest.mark.parametrize("encoding", [I8, I4, I3, I2])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 3e38])
def test_bad_scales_are_refused(encoding, scale):
    chunk, _ = one_chunk(encoding)
    payload = struct.pack("<f", scale) + chunk.payload[4:]

    with pytest.raises(E.BadScale, match="chunk 0: scale of block 0"):
        refuse(encoding, payload)


@pytest.mark.parametrize("encoding", [I8, I4, I3, I2])
@pytest.mark.parametrize("blocks", [-1, 1])
def test_a_block_too_many_or_too_few_is_refused(encoding, blocks):
    chunk, _ = one_chunk(encoding)
    payload = chunk.payload + bytes(4) if blocks > 0 else chunk.payload[4:]

    with pytest.raises(T.LengthMismatch, match="2 scale blocks of 256"):
        refuse(encoding, payload)


def test_int8_code_minus_128_is_refused():
    chunk, _ = one_chunk(I8)
    payload = bytearray(chunk.payload)
    payload[8 + 5] = 0x80

    with pytest.raises(E.BadCode, match="code -128 at value 5"):
        refuse(I8, bytes(payload))


def test_int4_code_zero_is_refused():
    chunk, _ = one_chunk(I4)
    payload = bytearray(chunk.payload)
    payload[8 + 2] &= 0xF0  # value 4 (low nibble of the third code byte)

    with pytest.raises(E.BadCode, match="code 0 at value 4"):
        refuse(I4, bytes(payload))


def test_int4_nibble_past_the_end_is_refused():
    chunk, _ = one_chunk(I4, n=301)
    payload = bytearray(chunk.payload)
    payload[-1] |= 0x30

    with pytest.raises(E.BadCode, match="padding nibble after value 300 has bit 0 set"):
        refuse(I4, bytes(payload), n=301)


@pytest.mark.parametrize("encoding", [I4, I3, I2])
def test_bit_packed_missing_last_byte_is_refused(encoding):
    chunk, _ = one_chunk(encoding, n=301)

    with pytest.raises(T.LengthMismatch, match="payload bytes for 301 values"):
        refuse(encoding, chunk.payload[:-1], n=301)


def test_int4_layout_is_nibbles_low_first_and_int3_one_bit_stream():
    x = np.array([-7, 7, 0, 1, -1], dtype=np.float32)
    payload, _ = E.encode(x, I4)
    assert payload[4:] == bytes([0x1 | 0xF << 4, 0x8 | 0x9 << 4, 0x7])  # codes 1, 15, 8, 9, 7
    x3 = np.array([-3, 3, 0], dtype=np.float32)
    payload, _ = E.encode(x3, I3)
    assert payload[4:] == (0b001 | 0b111 << 3 | 0b100 << 6).to_bytes(2, "little")  # codes 1, 7, 4


def test_int3_code_zero_and_bits_past_the_end_are_refused():
    chunk, _ = one_chunk(I3, n=301)  # 903 bits: 113 bytes, the last 1 bit padding
    payload = bytearray(chunk.payload)
    payload[-1] |= 0x80
    with pytest.raises(E.BadCode, match="padding 3-bit code after value 300 has bit 0 set"):
        refuse(I3, bytes(payload), n=301)
    payload = bytearray(chunk.payload)
    payload[8] &= 0b11111000  # value 0's code
    with pytest.raises(E.BadCode, match="int3 code 0 at value 0; codes are 1..7"):
        refuse(I3, bytes(payload), n=301)


def test_int2_code_zero_is_refused():
    chunk, _ = one_chunk(I2)
    payload = bytearray(chunk.payload)
    payload[8 + 1] &= 0b11110011  # value 5 (the second 2-bit code of the second code byte)

    with pytest.raises(E.BadCode, match="int2 code 0 at value 5; codes are 1..3"):
        refuse(I2, bytes(payload))


def test_int2_codes_past_the_end_are_refused():
    chunk, _ = one_chunk(I2, n=301)  # 76 code bytes: the last holds value 300 and three padding codes
    payload = bytearray(chunk.payload)
    payload[-1] |= 0b00100000

    with pytest.raises(E.BadCode, match="padding 2-bit code after value 300 has bit 3 set"):
        refuse(I2, bytes(payload), n=301)



def test_float16_infinity_is_caught_as_non_finite():
    payload = np.array([1.0, np.inf], dtype="<f2").tobytes()
    asm = T.ChunkAssembler([(0, 2)], F16, NONE)
    asm.add(pb.TensorChunk(tensor_id=0, offset=0, count=2, payload=payload, seq=0))
    import hashlib

    arrays = asm.finish(pb.Trailer(sha256=hashlib.sha256(payload).digest(), chunk_count=1))

    with pytest.raises(T.NonFiniteValues, match="tensor 0"):
        T.check_finite(arrays)


def test_a_broken_quantized_chunk_stops_the_stream():
    chunk, _ = one_chunk(I8)
    asm = T.ChunkAssembler([(0, 300)], I8, NONE)
    with pytest.raises(E.BadScale):
        asm.add(pb.TensorChunk(tensor_id=0, offset=0, count=300, payload=b"\xff" * 4 + chunk.payload[4:]))

    with pytest.raises(T.ChunkOrderError, match="ended or failed"):
        asm.add(chunk)


def test_stochastic_rounding_needs_an_rng_and_a_known_rounding():
    with pytest.raises(ValueError, match="rng"):
        E.encode(values(10), I8, "stochastic")
    with pytest.raises(ValueError, match="rounding"):
        T.ChunkEncoder([values(10)], I8, rounding="up")


@pytest.mark.parametrize("encoding", LOSSY)
def test_an_exact_tensor_travels_in_float32_beside_quantized_ones(encoding):
    arrays = [values(3000), values(700, 1)]
    enc = T.ChunkEncoder(arrays, encoding, ZSTD, chunk_elems=1000, exact=[False, True])
    chunks = list(enc.chunks())
    assert [s.exact for s in enc.specs()] == [False, True]

    out = assemble(enc.specs(), chunks, enc.trailer(), encoding)

    np.testing.assert_array_equal(out[1], arrays[1])  # the exact tensor: bit for bit
    np.testing.assert_array_equal(enc.decoded()[1], arrays[1])
    np.testing.assert_array_equal(out[0], enc.decoded()[0])
    assert not np.array_equal(out[0], arrays[0])
    exact_raw = sum(len(c.payload) for c in chunks if c.tensor_id == 1)
    assert enc.raw_bytes == E.payload_size(encoding, 3000) + 4 * 700 and exact_raw < 4 * 700 + 100


def test_a_quantized_chunk_for_an_exact_tensor_is_refused():
    # An edge that ignores the exact flag sends int8 codes where the receiver expects float32.
    arrays = [values(600)]
    enc, chunks, trailer = stream(arrays, I8, NONE)
    asm = T.ChunkAssembler([(0, 600, True)], I8, NONE)
    with pytest.raises(T.LengthMismatch, match="chunk 0"):
        asm.add(chunks[0])


def test_bad_scales_and_codes_are_defined_once_and_answer_invalid_argument():
    from fedocr import errors

    for cls in (E.BadScale, E.BadCode, E.PayloadSizeError):
        assert issubclass(cls, errors.WireFormatError) and issubclass(cls, ValueError)
        assert errors.status_name_for(cls("x")) == "INVALID_ARGUMENT"
    assert not hasattr(T, "BadScale") and not hasattr(T, "BadCode")
    assert T.WireFormatError is errors.WireFormatError
    assert errors.status_name_for(T.ChunkTooLarge("x")) == "RESOURCE_EXHAUSTED"


def test_a_leaf_sum_travels_in_float64_bit_for_bit_exact_tensors_too():
    rng = np.random.default_rng(3)
    total = [rng.standard_normal(1000) * 1e3, rng.standard_normal(7) / 3]  # not float32 values
    sender = T.ChunkEncoder(total, pb.ENCODING_FLOAT64, chunk_elems=300, exact=[False, True])
    chunks = list(sender.chunks())
    assert sender.raw_bytes == 8 * 1007 and {c.tensor_id for c in chunks} == {0, 1}
    receiver = T.ChunkAssembler([(0, 1000, False), (1, 7, True)], pb.ENCODING_FLOAT64)
    for chunk in chunks:
        receiver.add(chunk)
    got = receiver.finish(sender.trailer())
    assert all(g.dtype == np.float64 and np.array_equal(g, t) for g, t in zip(got, total, strict=True))
    assert not E.is_lossy(pb.ENCODING_FLOAT64) and "float64" not in E.NAMES  # no edge sends it


@pytest.mark.parametrize("encoding", sorted(E.BITS))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000, 1 << 16])
def test_group_unpacking_reads_what_bit_by_bit_reading_does(encoding, count):
    qmax = E.QMAX[encoding]
    q = np.random.default_rng(count).integers(-qmax, qmax + 1, count)
    body = np.frombuffer(E._pack(q, encoding), dtype=np.uint8)
    fast = E._unpack(body, encoding, count, "x")
    assert fast.dtype == np.float32
    np.testing.assert_array_equal(fast, q.astype(np.float32))
    np.testing.assert_array_equal(fast, E._unpack_bits(body, encoding, count, "x"))
