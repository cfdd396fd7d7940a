"""The state edges see, and its changes quantized with error feedback on the aggregator's side.

With a lossy download encoding the aggregator keeps, beside the exact global state G_t, the
visible state V_t that every edge holds. Closing a round, it encodes the change C = G_{t+1} - V_t
in the download encoding, decodes it exactly as an edge will, and sets V_{t+1} = V_t + decode(C).
What the code dropped, G_{t+1} - V_{t+1}, is carried into the next change: error feedback on the
server's side (DoubleSqueeze, Tang et al. 2019). Edges train from V and upload increments against
it; the averaging into G stays exact. An edge one version behind downloads one change, one further
behind the chain of changes since its version, and a new edge the full V in float32.

A change is kept as the download segment it is sent as (StateHeader, TensorChunks, Trailer), so
its bytes are encoded once and a restart changes no byte an edge receives.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from aggregator import fedavg
from fedocr import tensors
from fedocr.tensors import apply_segment, state_sha256
from fedocr.v1 import federation_pb2 as pb

_FRAME = struct.Struct("<I")  # a stored change: length-prefixed StateChunk messages
# A change rounds to the nearest level at each block's fitted scale (fedocr.encodings): error
# feedback here carries what the clipping drops into the next change.
DOWNLOAD_ROUNDING = "fit"


@dataclass(frozen=True)
class Change:
    """The encoded change from version ``header.base_state_version`` to ``header.state_version``."""

    header: pb.StateHeader
    chunks: tuple[pb.TensorChunk, ...]
    trailer: pb.Trailer

    @property
    def version(self) -> int:
        """The visible version this change leads to."""
        return int(self.header.state_version)

    def messages(self) -> Iterable[pb.StateChunk]:
        """The download segment: header, chunks, trailer."""
        yield pb.StateChunk(header=self.header)
        for chunk in self.chunks:
            yield pb.StateChunk(chunk=chunk)
        yield pb.StateChunk(trailer=self.trailer)

    def to_bytes(self) -> bytes:
        """The stored form: each StateChunk of the segment, length-prefixed."""
        parts = []
        for message in self.messages():
            data = message.SerializeToString()
            parts += [_FRAME.pack(len(data)), data]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Change:
        """Inverse of to_bytes."""
        messages, at = [], 0
        while at < len(data):
            (size,) = _FRAME.unpack_from(data, at)
            messages.append(pb.StateChunk.FromString(data[at + _FRAME.size : at + _FRAME.size + size]))
            at += _FRAME.size + size
        header, *chunks, trailer = messages
        return cls(header.header, tuple(c.chunk for c in chunks), trailer.trailer)


def encode_change(
    visible: np.ndarray,
    target: np.ndarray,
    version: int,
    specs: Sequence[tuple[int, int, bool]],
    encoding: int,
    zstd_level: int,
    chunk_elements: int,
    rounding: str = DOWNLOAD_ROUNDING,
) -> tuple[Change, np.ndarray]:
    """The change from ``visible`` (V at ``version - 1``) to ``target`` (the new G), and V at ``version``.

    The change is decoded with the edges' own reader (ChunkAssembler), so the returned state is the
    one every edge computes, byte for byte. Exact tensors (running statistics) travel in float32;
    the others round as ``rounding`` says (fedocr.encodings).
    """
    change = np.subtract(target, visible, dtype=np.float32)
    lengths = [n for _, n, _ in specs]
    encoder = tensors.ChunkEncoder(
        fedavg.split(change, lengths), encoding, pb.COMPRESSION_ZSTD, level=zstd_level,
        chunk_elems=chunk_elements, ids=[i for i, _, _ in specs], exact=[e for _, _, e in specs],
        rounding=rounding,
    )
    chunks = tuple(encoder.chunks())
    trailer = encoder.trailer()
    following, _ = apply_segment(visible, specs, encoding, chunks, trailer)
    header = pb.StateHeader(
        state_version=version,
        base_state_version=version - 1,
        tensors=[pb.TensorSpec(id=i, length=n, exact=e) for i, n, e in specs],
        encoding=encoding,
        compression=pb.COMPRESSION_ZSTD,
        raw_bytes=encoder.raw_bytes,
        wire_bytes=encoder.wire_bytes,
        state_sha256=state_sha256(following),
    )
    return Change(header, chunks, trailer), following


def chain_to_keep(changes: Sequence[Change], state_bytes: int) -> list[Change]:
    """The newest changes whose bytes together stay within the full state's: older ones are never
    cheaper than downloading the state itself. ``changes`` oldest first; returns oldest first."""
    kept, total = [], 0
    for change in reversed(changes):
        total += change.header.wire_bytes
        if total > state_bytes:
            break
        kept.append(change)
    return kept[::-1]


__all__ = ["DOWNLOAD_ROUNDING", "Change", "chain_to_keep", "encode_change"]
