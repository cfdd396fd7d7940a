"""Round trips, every error case and the byte accounting of the tensor codec."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedocr import tensors as T
from fedocr.v1 import federation_pb2 as pb

NONE, ZSTD = pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD


def encode(arrays, compression=ZSTD, chunk_elems=3):
    enc = T.ChunkEncoder(arrays, compression=compression, chunk_elems=chunk_elems)
    chunks = list(enc.chunks())
    return enc, chunks, enc.trailer()


def assemble(specs, chunks, trailer, compression=ZSTD, **kw):
    asm = T.ChunkAssembler(specs, compression=compression, **kw)
    for chunk in chunks:
        asm.add(chunk)
    return asm.finish(trailer)


def copy(chunk, **changes):
    out = pb.TensorChunk()
    out.CopyFrom(chunk)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


ARRAYS = [
    np.array([1.0, -2.5, 3.25, 0.0, 7.0], dtype=np.float32),
    np.array([], dtype=np.float32),
    np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32),
    np.array([1e-30], dtype=np.float64),
]
SPECS = [(0, 5), (1, 0), (2, 4), (3, 1)]


@pytest.mark.parametrize("compression", [NONE, ZSTD])
def test_round_trip_several_tensors(compression):
    enc, chunks, trailer = encode(ARRAYS, compression)

    out = assemble(SPECS, chunks, trailer, compression)

    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4]
    assert [(c.tensor_id, c.offset, c.count) for c in chunks] == [
        (0, 0, 3),
        (0, 3, 2),
        (2, 0, 3),
        (2, 3, 1),
        (3, 0, 1),
    ]
    assert out[0].tolist() == [1.0, -2.5, 3.25, 0.0, 7.0]
    assert out[1].size == 0
    assert out[2].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert out[3][0] == np.float32(1e-30)
    assert all(a.dtype == np.float32 for a in out)
    assert trailer.chunk_count == 5
    assert [(s.id, s.length) for s in enc.specs()] == SPECS


def test_payload_is_little_endian_float32():
    (chunk,) = T.iter_chunks([np.array([1.0, -2.0], dtype=">f4")], compression=NONE)

    assert chunk.payload == bytes.fromhex("0000803f000000c0")


def test_digest_covers_uncompressed_payloads_in_stream_order():
    values = np.arange(7, dtype=np.float32)
    _, _, trailer = encode([values], ZSTD, chunk_elems=4)

    assert trailer.sha256 == hashlib.sha256(values.astype("<f4").tobytes()).digest()


def test_byte_accounting_matches_on_both_sides():
    values = np.zeros(1000, dtype=np.float32)
    enc, chunks, trailer = encode([values], ZSTD, chunk_elems=300)
    asm = T.ChunkAssembler([(0, 1000)])
    for chunk in chunks:
        asm.add(chunk)
    asm.finish(trailer)

    assert enc.raw_bytes == asm.raw_bytes == 4000
    assert enc.wire_bytes == asm.wire_bytes == sum(len(c.payload) for c in chunks)
    assert enc.wire_bytes < 400  # zeros compress
    assert asm.digest() == trailer.sha256


def test_default_chunk_is_one_mebibyte_of_values():
    chunks = list(T.iter_chunks([np.zeros(T.DEFAULT_CHUNK_ELEMS + 1, dtype=np.float32)]))

    assert [c.count for c in chunks] == [262144, 1]


def test_specs_accept_proto_messages():
    _, chunks, trailer = encode([ARRAYS[0]])

    out = assemble([pb.TensorSpec(id=0, length=5)], chunks, trailer)

    assert out[0][4] == 7.0


@pytest.mark.parametrize("encoding", [pb.ENCODING_UNSPECIFIED, 99])
def test_unsupported_encoding(encoding):
    with pytest.raises(T.UnsupportedEncoding, match="not supported"):
        T.ChunkAssembler([(0, 1)], encoding=encoding)
    with pytest.raises(T.UnsupportedEncoding):
        T.ChunkEncoder([np.zeros(1)], encoding=encoding)


def test_masked_integers_round_trip_as_uint32_exact_tensors_included():
    masked = [np.array([0, 1, 2**32 - 1], np.uint32), np.arange(5, dtype=np.uint32) * 999_999_937]
    enc = T.ChunkEncoder(masked, pb.ENCODING_MASKED_INT, chunk_elems=2, exact=[False, True])
    chunks = list(enc.chunks())

    assembler = T.ChunkAssembler([(0, 3), (1, 5, True)], pb.ENCODING_MASKED_INT)
    for chunk in chunks:
        assembler.add(chunk)
    out = assembler.finish(enc.trailer())

    assert [a.dtype for a in out] == [np.uint32, np.uint32]
    assert [a.tolist() for a in out] == [a.tolist() for a in masked]
    assert enc.raw_bytes == 4 * 8


def test_unsupported_compression():
    with pytest.raises(T.UnsupportedEncoding, match="COMPRESSION_UNSPECIFIED"):
        T.ChunkAssembler([(0, 1)], compression=pb.COMPRESSION_UNSPECIFIED)


def test_encoder_rejects_bad_settings():
    with pytest.raises(ValueError, match="chunk_elems"):
        T.ChunkEncoder([np.zeros(1)], chunk_elems=T.MAX_CHUNK_RAW_BYTES // 4 + 1)
    with pytest.raises(ValueError, match="level"):
        T.ChunkEncoder([np.zeros(1)], level=0)
    with pytest.raises(ValueError, match="unique"):
        T.ChunkEncoder([np.zeros(1), np.zeros(1)], ids=[4, 4])


def test_trailer_before_all_chunks_is_refused():
    enc = T.ChunkEncoder([np.zeros(10)], chunk_elems=4)
    next(enc.chunks())

    with pytest.raises(RuntimeError, match="trailer"):
        enc.trailer()


def test_duplicate_manifest_ids_refused():
    with pytest.raises(T.WireFormatError, match="twice"):
        T.ChunkAssembler([(1, 2), (1, 3)])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"seq": 1}, T.ChunkOrderError, "seq 1 where 0"),
        ({"tensor_id": 9}, T.UnknownTensor, "tensor 9"),
        ({"count": 0}, T.LengthMismatch, "empty"),
        ({"offset": 1}, T.ChunkOrderError, "gap"),
        ({"offset": 4}, T.LengthMismatch, "which has 5 values"),
        ({"count": 2}, T.LengthMismatch, "declares 12"),
        ({"count": T.MAX_CHUNK_RAW_BYTES // 4 + 1}, T.ChunkTooLarge, "limit"),
        ({"payload": b"not zstd at all"}, T.WireFormatError, "not a zstd frame"),
    ],
)
def test_first_chunk_errors(change, error, match):
    _, chunks, _ = encode([ARRAYS[0]])
    asm = T.ChunkAssembler([(0, 5)])

    with pytest.raises(error, match=match):
        asm.add(copy(chunks[0], **change))


def test_overlap_is_refused():
    _, chunks, _ = encode([ARRAYS[0]])
    asm = T.ChunkAssembler([(0, 5)])
    asm.add(chunks[0])

    with pytest.raises(T.ChunkOrderError, match="overlaps"):
        asm.add(copy(chunks[1], offset=2))


def test_raw_payload_size_must_match_count():
    _, chunks, _ = encode([ARRAYS[0]], NONE)
    asm = T.ChunkAssembler([(0, 5)], compression=NONE)

    with pytest.raises(T.LengthMismatch, match="8 payload bytes for 3"):
        asm.add(copy(chunks[0], payload=chunks[0].payload[:8]))


def test_zstd_padding_and_truncation_refused():
    _, chunks, _ = encode([ARRAYS[0]])
    payload = chunks[0].payload

    with pytest.raises(T.LengthMismatch, match="exactly one zstd frame"):
        T.ChunkAssembler([(0, 5)]).add(copy(chunks[0], payload=payload + b"junk"))
    with pytest.raises(T.WireFormatError):
        T.ChunkAssembler([(0, 5)]).add(copy(chunks[0], payload=payload[:-3]))


def test_zstd_bomb_with_lying_header_is_refused():
    # 64 MiB of zeros whose frame header claims 12 bytes: decoding must stop at 12.
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20)))
    header_size = zstandard.frame_header_size(bytes(frame))
    frame[header_size - 4 : header_size] = (12).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(frame)) == 12
    chunk = pb.TensorChunk(tensor_id=0, offset=0, count=3, payload=bytes(frame), seq=0)

    with pytest.raises(T.WireFormatError, match="does not decompress"):
        T.ChunkAssembler([(0, 5)]).add(chunk)


def test_oversized_compressed_payload_refused():
    chunk = pb.TensorChunk(tensor_id=0, offset=0, count=4, payload=bytes(16 + 256 + 1), seq=0)

    with pytest.raises(T.ChunkTooLarge):
        T.ChunkAssembler([(0, 8)], max_chunk_bytes=16).add(chunk)


def test_assembler_refuses_input_after_an_error():
    _, chunks, _ = encode([ARRAYS[0]])
    asm = T.ChunkAssembler([(0, 5)])
    with pytest.raises(T.ChunkOrderError):
        asm.add(copy(chunks[0], seq=3))

    with pytest.raises(T.ChunkOrderError, match="ended or failed"):
        asm.add(chunks[0])


def test_incomplete_stream_refused():
    _, chunks, trailer = encode([ARRAYS[0]])

    with pytest.raises(T.LengthMismatch, match="tensor 0 at 3 of 5"):
        assemble([(0, 5)], chunks[:1], trailer)


def test_chunk_count_mismatch_refused():
    _, chunks, trailer = encode([ARRAYS[0]])

    with pytest.raises(T.LengthMismatch, match="trailer counts 7"):
        assemble([(0, 5)], chunks, pb.Trailer(sha256=trailer.sha256, chunk_count=7))


def test_checksum_mismatch_refused():
    _, chunks, trailer = encode([ARRAYS[0]])

    with pytest.raises(T.ChecksumMismatch):
        assemble([(0, 5)], chunks, pb.Trailer(sha256=bytes(32), chunk_count=trailer.chunk_count))


def test_check_finite():
    T.check_finite([np.array([1.0, -3.0]), np.zeros((2, 2))])

    with pytest.raises(
        T.NonFiniteValues, match="tensor 7 has 2 non-finite value\\(s\\), the first at element 1"
    ):
        T.check_finite([np.zeros(2), np.array([0.0, np.nan, np.inf])], ids=[3, 7])


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(np.float32, st.integers(0, 40), elements=st.floats(width=32, allow_nan=False)),
        min_size=1,
        max_size=4,
    ),
    chunk_elems=st.integers(1, 17),
    compression=st.sampled_from([NONE, ZSTD]),
)
def test_round_trip_property(arrays, chunk_elems, compression):
    enc, chunks, trailer = encode(arrays, compression, chunk_elems)

    out = assemble(enc.specs(), chunks, trailer, compression)

    for got, want in zip(out, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
