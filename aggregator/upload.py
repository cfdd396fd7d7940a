"""Staging one upload stream: parse header/chunks/trailer, decode into a scratch copy, verify.

Nothing here touches the round's sum: a staged upload is only added once every check passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from aggregator import fedavg
from aggregator.spool import SpoolFile
from fedocr import encodings, tensors
from fedocr.errors import MalformedRequest
from fedocr.v1 import federation_pb2 as pb


@dataclass
class Staged:
    """A verified increment: per-tensor arrays in manifest order (float32; uint32 when masked)."""

    arrays: list[np.ndarray]
    raw_bytes: int
    wire_bytes: int
    sha256: bytes
    peak: float  # the largest magnitude among the values
    chunks: int = 0


def read_header(messages: Iterator[pb.UploadMessage]) -> pb.UploadHeader:
    """Take the first message of an upload stream, which must be the header."""
    first = next(messages, None)
    if first is None:
        raise MalformedRequest("empty upload stream: send an UploadHeader, the chunks, then a Trailer")
    if first.WhichOneof("kind") != "header":
        raise MalformedRequest(f"upload stream starts with a {first.WhichOneof('kind')}, not a header")
    return first.header


def stage(
    header: pb.UploadHeader,
    messages: Iterator[pb.UploadMessage],
    specs: list[tuple[int, int, bool]],
    max_chunk_bytes: int,
    spooled: SpoolFile | None = None,
    out: list[np.ndarray] | None = None,
) -> Staged:
    """Consume chunks up to the trailer and return the verified arrays; ``spooled``, when given,
    gets each chunk once it was accepted (aggregator/spool.py); ``out``: arrays to decode into.

    Raises a fedocr.errors.WireFormatError subclass (order, lengths, checksum, encoding, size,
    non-finite values) or MalformedRequest (stream shape: missing trailer, second header).
    """
    assembler = tensors.ChunkAssembler(specs, header.encoding, header.compression, max_chunk_bytes, out)
    for message in messages:
        kind = message.WhichOneof("kind")
        if kind == "chunk":
            assembler.add(message.chunk)
            if spooled is not None:
                spooled.write(message.chunk)
        elif kind == "trailer":
            arrays = assembler.finish(message.trailer)
            if next(messages, None) is not None:
                raise MalformedRequest("upload stream continues after the trailer")
            if header.encoding in encodings.MASKED_DTYPES:  # uint32 masked values: no float checks
                peak = 0.0
            else:
                tensors.check_finite(arrays, [i for i, _, _ in specs])
                peak = fedavg.peak(arrays)
            sizes = (assembler.raw_bytes, assembler.wire_bytes)
            return Staged(arrays, *sizes, message.trailer.sha256, peak, assembler.chunk_count)
        else:
            raise MalformedRequest(f"unexpected {kind} after the header of an upload stream")
    raise MalformedRequest(
        f"upload stream ended after {assembler.chunk_count} chunk(s) without a trailer (truncated)"
    )
