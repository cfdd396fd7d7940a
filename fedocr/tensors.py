"""The tensor codec of the wire: float vectors to and from a checksummed stream of TensorChunks.

A stream is: chunks with ``seq`` 0, 1, 2 ..., each holding ``count`` consecutive elements of one
tensor starting at ``offset``, encoded (fedocr.encodings: float32, float16, int8 or int4 with
block scales) and then compressed on its own (COMPRESSION_ZSTD: one zstd frame that records its
content size, or COMPRESSION_NONE); then a Trailer whose ``sha256`` covers the encoded,
uncompressed payloads in stream order and whose ``chunk_count`` is the number of chunks. Within
one tensor the chunks are contiguous and in order; tensors may interleave. Empty tensors send no
chunk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import zstandard

from fedocr import encodings
from fedocr.errors import WireFormatError
from fedocr.v1 import federation_pb2 as pb

FLOAT32 = np.dtype("<f4")  # ENCODING_FLOAT32 on the wire, whatever the host's byte order
DEFAULT_CHUNK_ELEMS = (1 << 20) // FLOAT32.itemsize  # 1 MiB of raw float32 values per chunk
MAX_CHUNK_RAW_BYTES = 2 << 20  # hard cap, well under gRPC's 4 MiB default message limit
DEFAULT_ZSTD_LEVEL = 3
# A zstd frame of incompressible data is a little larger than its input (ZSTD_COMPRESSBOUND:
# n + n/256 + at most 64, plus an 18-byte header); allow that, no more.
_ZSTD_SLACK_BYTES = 256

_ENCODINGS = (*encodings.NAMES.values(), *encodings.MASKED_DTYPES, pb.ENCODING_FLOAT64)
_COMPRESSIONS = (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD)


class UnsupportedEncoding(WireFormatError):
    """An Encoding or Compression value this build does not implement."""


class UnknownTensor(WireFormatError):
    """A chunk names a tensor id that is not in the manifest."""


class ChunkOrderError(WireFormatError):
    """A chunk out of sequence, overlapping earlier elements, or leaving a gap."""


class LengthMismatch(WireFormatError):
    """Sizes disagree: payload vs count, chunk vs tensor bounds, stream vs manifest or trailer."""


class ChecksumMismatch(WireFormatError):
    """The trailer's sha256 is not the digest of the payloads received."""


class StateMismatch(WireFormatError):
    """A downloaded state whose SHA-256 is not the one its header announced."""


class ChunkTooLarge(WireFormatError):
    """A chunk above the size limit, before or after decompression (maps to RESOURCE_EXHAUSTED)."""


class NonFiniteValues(WireFormatError):
    """A tensor holds NaN or infinity."""


def _check_codec(encoding: int, compression: int) -> None:
    """Raise UnsupportedEncoding for an encoding or compression this build does not implement."""
    if encoding not in _ENCODINGS:
        raise UnsupportedEncoding(
            f"encoding {encodings.name_of(encoding)} is not supported (known: {', '.join(encodings.NAMES)})"
        )
    if compression not in _COMPRESSIONS:
        name = pb.Compression.Name(compression) if compression in pb.Compression.values() else compression
        raise UnsupportedEncoding(
            f"compression {name} is not supported (COMPRESSION_NONE or COMPRESSION_ZSTD)"
        )


def exact_encoding(encoding: int) -> int:
    """How a tensor marked exact travels in a stream of ``encoding``: float32, or in a masked stream
    32-bit masked fixed point (secure aggregation masks every tensor; the narrow masked widths carry
    b-bit codes, too coarse for running statistics); a leaf's float64 sum carries them in float64."""
    if encoding == pb.ENCODING_FLOAT64:
        return encoding
    return pb.ENCODING_MASKED_INT if encoding in encodings.MASKED_DTYPES else pb.ENCODING_FLOAT32


def _value_dtype(encoding: int) -> np.dtype:
    """The dtype values are held in on both sides: float64 for a leaf's sum, else float32."""
    return np.dtype(np.float64) if encoding == pb.ENCODING_FLOAT64 else np.dtype(np.float32)


def _quantized(encoding: int) -> bool:
    """Whether values decode to other floats than were sent (masked values are sent as they are)."""
    return encodings.is_lossy(encoding) and encoding not in encodings.MASKED_DTYPES


class ChunkEncoder:
    """Writer side: turns flat tensors into TensorChunks, then a Trailer.

    Parameters: ``tensors`` are flattened (C order) and encoded with ``encoding`` (fedocr.encodings;
    the quantized ones round to ``rounding``, stochastic rounding drawing from ``seed``); ``ids``
    default to 0..n-1; ``exact`` marks tensors sent in float32 whatever ``encoding`` is (the
    TensorSpec's exact flag); ``level`` is the zstd level (ignored for COMPRESSION_NONE);
    ``chunk_elems`` is the number of values per chunk, at most MAX_CHUNK_RAW_BYTES // 4. After the
    chunks were taken, ``decoded()`` gives the values the receiver will decode (for error feedback).
    """

    def __init__(
        self,
        tensors: Sequence[np.ndarray],
        encoding: int = pb.ENCODING_FLOAT32,
        compression: int = pb.COMPRESSION_ZSTD,
        level: int = DEFAULT_ZSTD_LEVEL,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        ids: Sequence[int] | None = None,
        rounding: str = "nearest",
        seed: int = 0,
        exact: Sequence[bool] | None = None,
    ) -> None:
        _check_codec(encoding, compression)
        if not 1 <= chunk_elems <= MAX_CHUNK_RAW_BYTES // FLOAT32.itemsize:
            raise ValueError(
                f"chunk_elems must be in 1..{MAX_CHUNK_RAW_BYTES // FLOAT32.itemsize}, got {chunk_elems}"
            )
        if compression == pb.COMPRESSION_ZSTD and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level must be in 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {level}")
        if rounding not in encodings.ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(encodings.ROUNDINGS)}, got {rounding!r}")
        ids = list(range(len(tensors))) if ids is None else list(ids)
        if len(ids) != len(tensors) or len(set(ids)) != len(ids):
            raise ValueError("ids must be unique, one per tensor")
        self._exact = [False] * len(tensors) if exact is None else [bool(e) for e in exact]
        if len(self._exact) != len(tensors):
            raise ValueError("exact must have one flag per tensor")
        masked = encoding in encodings.MASKED_DTYPES  # uint32, every tensor: masks cover them all
        dtype = encodings.MASKED if masked else _value_dtype(encoding)
        self._tensors = [np.ascontiguousarray(t, dtype=dtype).reshape(-1) for t in tensors]
        self._ids = ids
        self._encodings = [exact_encoding(encoding) if e else encoding for e in self._exact]
        self._rounding = rounding
        self._rng = np.random.default_rng(seed)
        # What the receiver will decode; float32 decodes to the inputs themselves (no copy).
        self._decoded = [
            np.empty(t.size, np.float32) if _quantized(enc) else t
            for t, enc in zip(self._tensors, self._encodings, strict=True)
        ]
        self._compressor = (
            zstandard.ZstdCompressor(level=level, write_content_size=True)
            if compression == pb.COMPRESSION_ZSTD
            else None
        )
        self._chunk_elems = chunk_elems
        self._digest = hashlib.sha256()
        self._started = False
        self._done = False
        self.chunk_count = 0
        self.raw_bytes = 0  # encoded payload bytes before compression
        self.wire_bytes = 0  # payload bytes as sent

    def specs(self) -> list[pb.TensorSpec]:
        """The manifest entries (id, length, exact) of the tensors being sent."""
        return [
            pb.TensorSpec(id=i, length=t.size, exact=e)
            for i, t, e in zip(self._ids, self._tensors, self._exact, strict=True)
        ]

    def chunks(self) -> Iterator[pb.TensorChunk]:
        """Yield the chunks in stream order; may be iterated once."""
        if self._started:
            raise RuntimeError("ChunkEncoder.chunks() may be iterated only once")
        self._started = True
        tensors = zip(self._ids, self._tensors, self._decoded, self._encodings, strict=True)
        for tensor_id, values, decoded, encoding in tensors:
            for offset in range(0, values.size, self._chunk_elems):
                part = values[offset : offset + self._chunk_elems]
                raw, values_out = encodings.encode(part, encoding, self._rounding, self._rng)
                if _quantized(encoding):
                    decoded[offset : offset + part.size] = values_out
                payload = self._compressor.compress(raw) if self._compressor else raw
                self._digest.update(raw)
                chunk = pb.TensorChunk(
                    tensor_id=tensor_id,
                    offset=offset,
                    count=part.size,
                    payload=payload,
                    seq=self.chunk_count,
                )
                self.chunk_count += 1
                self.raw_bytes += len(raw)
                self.wire_bytes += len(payload)
                yield chunk
        self._done = True

    def decoded(self) -> list[np.ndarray]:
        """The values as the receiver decodes them (the inputs, for float32); after every chunk."""
        if not self._done:
            raise RuntimeError("decoded() before all chunks were taken")
        return self._decoded

    def trailer(self) -> pb.Trailer:
        """The Trailer for the stream; only after every chunk was taken."""
        if not self._done:
            raise RuntimeError("trailer() before all chunks were taken")
        return pb.Trailer(sha256=self._digest.digest(), chunk_count=self.chunk_count)


def iter_chunks(
    tensors: Sequence[np.ndarray],
    encoding: int = pb.ENCODING_FLOAT32,
    compression: int = pb.COMPRESSION_ZSTD,
    level: int = DEFAULT_ZSTD_LEVEL,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of ``tensors`` (ids 0..n-1); use ChunkEncoder to get the trailer too."""
    yield from ChunkEncoder(tensors, encoding, compression, level, chunk_elems).chunks()


def spec_tuple(spec: pb.TensorSpec | tuple[int, int] | tuple[int, int, bool]) -> tuple[int, int, bool]:
    """(id, length, exact) of a TensorSpec or of an (id, length[, exact]) tuple."""
    if isinstance(spec, pb.TensorSpec):
        return int(spec.id), int(spec.length), bool(spec.exact)
    return int(spec[0]), int(spec[1]), bool(spec[2]) if len(spec) > 2 else False


class ChunkAssembler:
    """Reader side: checks chunks one at a time and writes them into preallocated arrays (float32;
    float64 for a leaf's ENCODING_FLOAT64 sum; uint32 when masked).

    Parameters: ``specs`` are the manifest's TensorSpec messages or (id, length[, exact])
    tuples; tensors marked exact are read as float32 whatever ``encoding`` is;
    ``max_chunk_bytes`` caps one chunk's decoded size; ``out``, arrays of the specs' lengths and
    the values' dtype to write into (reused buffers), else new ones. After any error the assembler refuses
    further input. ``raw_bytes`` / ``wire_bytes`` count decoded and received payload bytes.
    """

    def __init__(
        self,
        specs: Sequence[pb.TensorSpec | tuple[int, int] | tuple[int, int, bool]],
        encoding: int = pb.ENCODING_FLOAT32,
        compression: int = pb.COMPRESSION_ZSTD,
        max_chunk_bytes: int = MAX_CHUNK_RAW_BYTES,
        out: Sequence[np.ndarray] | None = None,
    ) -> None:
        _check_codec(encoding, compression)
        triples = [spec_tuple(s) for s in specs]
        if len({i for i, _, _ in triples}) != len(triples):
            raise WireFormatError("the manifest names a tensor id twice")
        self._index = {tensor_id: k for k, (tensor_id, _, _) in enumerate(triples)}
        self._ids = [tensor_id for tensor_id, _, _ in triples]
        masked = encoding in encodings.MASKED_DTYPES  # uint32 arrays; exact tensors are masked too
        self._encodings = [exact_encoding(encoding) if exact else encoding for _, _, exact in triples]
        dtype = np.uint32 if masked else _value_dtype(encoding)
        if out is None:
            self._arrays = [np.empty(length, dtype=dtype) for _, length, _ in triples]
        elif [(a.dtype, a.shape) for a in out] != [(np.dtype(dtype), (n,)) for _, n, _ in triples]:
            raise ValueError("the output arrays do not match the specs' lengths and the values' dtype")
        else:
            self._arrays = list(out)
        self._filled = [0] * len(triples)  # next expected offset per tensor
        # The limit is on decoded float32 values, whatever the encoding carries them in.
        self._max_elems = max_chunk_bytes // FLOAT32.itemsize
        max_payload = max(encodings.payload_size(e, self._max_elems) for e in {encoding, *self._encodings})
        self._max_wire = max_payload + (max_payload >> 8) + _ZSTD_SLACK_BYTES
        self._decompressor = None
        if compression == pb.COMPRESSION_ZSTD:
            window = max(1 << 20, 1 << (max_chunk_bytes - 1).bit_length())
            self._decompressor = zstandard.ZstdDecompressor(max_window_size=window)
        self._digest = hashlib.sha256()
        self._broken = False
        self._finished = False
        self.chunk_count = 0
        self.raw_bytes = 0
        self.wire_bytes = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        """Check one chunk and copy its values in place; raise a WireFormatError subclass if bad."""
        if self._broken or self._finished:
            raise ChunkOrderError("chunk after the stream ended or failed")
        try:
            self._add(chunk)
        except WireFormatError:
            self._broken = True
            raise

    def _add(self, chunk: pb.TensorChunk) -> None:
        if chunk.seq != self.chunk_count:
            raise ChunkOrderError(f"chunk seq {chunk.seq} where {self.chunk_count} was expected")
        k = self._index.get(chunk.tensor_id)
        if k is None:
            raise UnknownTensor(f"chunk {chunk.seq} names tensor {chunk.tensor_id}, not in the manifest")
        if chunk.count == 0:
            raise LengthMismatch(f"chunk {chunk.seq} is empty")
        if chunk.count > self._max_elems or len(chunk.payload) > self._max_wire:
            raise ChunkTooLarge(
                f"chunk {chunk.seq} holds {chunk.count} values / {len(chunk.payload)} bytes; "
                f"the limit is {self._max_elems} values"
            )
        length = self._arrays[k].size
        if chunk.offset + chunk.count > length:
            raise LengthMismatch(
                f"chunk {chunk.seq} covers [{chunk.offset}, {chunk.offset + chunk.count}) "
                f"of tensor {chunk.tensor_id}, which has {length} values"
            )
        expected = self._filled[k]
        if chunk.offset != expected:
            what = "overlaps earlier values" if chunk.offset < expected else "leaves a gap"
            raise ChunkOrderError(
                f"chunk {chunk.seq} starts at {chunk.offset} of tensor {chunk.tensor_id} and {what} "
                f"(next expected offset {expected})"
            )
        encoding = self._encodings[k]
        raw = self._decode(chunk, encoding)
        where = f"chunk {chunk.seq}"
        try:
            values = encodings.decode(raw, encoding, chunk.count, where, copy=False)  # copied below
        except (encodings.BadScale, encodings.BadCode):
            raise  # already the wire error it is; only a wrong size is reported as a length
        except encodings.EncodingError as exc:
            raise LengthMismatch(str(exc)) from None
        self._arrays[k][chunk.offset : chunk.offset + chunk.count] = values
        self._digest.update(raw)
        self._filled[k] += chunk.count
        self.chunk_count += 1
        self.raw_bytes += len(raw)
        self.wire_bytes += len(chunk.payload)

    def _decode(self, chunk: pb.TensorChunk, encoding: int) -> bytes:
        """Return the encoded bytes of ``chunk``, decompressed with an exact output bound."""
        if self._decompressor is None:
            return chunk.payload  # its size is checked against the count when it is decoded
        size = encodings.payload_size(encoding, chunk.count)
        try:
            declared = zstandard.frame_content_size(chunk.payload)
        except zstandard.ZstdError as exc:
            raise WireFormatError(f"chunk {chunk.seq} is not a zstd frame: {exc}") from exc
        if declared != size:
            raise LengthMismatch(
                f"chunk {chunk.seq} declares {declared} decompressed bytes for {chunk.count} values"
            )
        # libzstd stops at the declared content size, so a frame that lies about it cannot
        # expand past ``size`` (the zstd-bomb guard); eof and unused_data reject truncated or
        # padded payloads.
        stream = self._decompressor.decompressobj()
        try:
            raw = stream.decompress(chunk.payload)
        except zstandard.ZstdError as exc:
            raise WireFormatError(f"chunk {chunk.seq} does not decompress: {exc}") from exc
        if not stream.eof or stream.unused_data or len(raw) != size:
            raise LengthMismatch(f"chunk {chunk.seq} is not exactly one zstd frame of {size} bytes")
        return raw

    def finish(self, trailer: pb.Trailer) -> list[np.ndarray]:
        """Check completeness, chunk count and checksum; return the arrays in manifest order."""
        if self._broken or self._finished:
            raise ChunkOrderError("trailer after the stream ended or failed")
        self._broken = True  # whatever happens below, no more input is accepted
        short = [
            (i, f, a.size)
            for i, f, a in zip(self._ids, self._filled, self._arrays, strict=True)
            if f != a.size
        ]
        if short:
            tensor_id, filled, length = short[0]
            raise LengthMismatch(
                f"stream ended with tensor {tensor_id} at {filled} of {length} values "
                f"({len(short)} tensor(s) incomplete)"
            )
        if trailer.chunk_count != self.chunk_count:
            raise LengthMismatch(
                f"trailer counts {trailer.chunk_count} chunks, {self.chunk_count} were received"
            )
        if trailer.sha256 != self._digest.digest():
            raise ChecksumMismatch("trailer sha256 does not match the payloads received")
        self._finished = True
        return self._arrays

    def digest(self) -> bytes:
        """The sha256 of the payloads received so far."""
        return self._digest.digest()


def state_sha256(state: np.ndarray) -> bytes:
    """SHA-256 of a flat state's float32 little-endian bytes: what edges check a download against."""
    return hashlib.sha256(np.ascontiguousarray(state, dtype=FLOAT32).tobytes()).digest()


def apply_segment(
    held: np.ndarray | None,
    specs: Sequence[pb.TensorSpec | tuple[int, int, bool]],
    encoding: int,
    chunks: Iterable[pb.TensorChunk],
    trailer: pb.Trailer,
    compression: int = pb.COMPRESSION_ZSTD,
) -> tuple[np.ndarray, int]:
    """Decode one download segment: the state after it (``held`` + the change, or the state itself
    when ``held`` is None) and the segment's decoded payload bytes. Raises a WireFormatError
    subclass on bad chunks."""
    assembler = ChunkAssembler(specs, encoding, compression)
    for chunk in chunks:
        assembler.add(chunk)
    values = np.concatenate(assembler.finish(trailer)).astype(FLOAT32, copy=False)
    state = values if held is None else np.add(held, values, dtype=np.float32)
    return state, assembler.raw_bytes


def check_finite(arrays: Sequence[np.ndarray], ids: Sequence[int] | None = None) -> None:
    """Raise NonFiniteValues naming the first tensor (by id, default its index) with NaN or inf."""
    for k, values in enumerate(arrays):
        finite = np.isfinite(values)
        if not finite.all():
            bad = np.flatnonzero(~finite.reshape(-1))
            tensor_id = k if ids is None else ids[k]
            raise NonFiniteValues(
                f"tensor {tensor_id} has {bad.size} non-finite value(s), the first at element {bad[0]}"
            )
