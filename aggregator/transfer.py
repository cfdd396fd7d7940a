"""DownloadState's payload: the state encoded once per version and streamed to every edge.

Encoding (zstd at the operator's level) is the costly part of a download, so the chunks of the
latest version are kept; memory stays O(model) whatever the number of edges. A download is one or
more segments (header, chunks, trailer): the full state, or the chain of changes since the
version the edge holds (aggregator/visible.py).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator import fedavg
from aggregator.rounds import Bytes
from aggregator.visible import Change
from fedocr import tensors
from fedocr.v1 import federation_pb2 as pb


@dataclass
class Encoded:
    """One version of the full state as wire chunks, with the SHA-256 of its float32 bytes."""

    version: int
    chunks: list[pb.TensorChunk]
    trailer: pb.Trailer
    raw_bytes: int
    wire_bytes: int
    sha256: bytes


@dataclass
class StateStream:
    """A download: its segments in order (a header alone when the edge holds the version)."""

    segments: Sequence[Iterable[pb.StateChunk]]
    moved: Bytes = field(default_factory=Bytes)
    on_done: Callable[[Bytes], None] | None = field(default=None)

    def messages(self) -> Iterator[pb.StateChunk]:
        """Yield the StateChunk stream; reports the bytes moved just before the last message."""
        flat = itertools.chain.from_iterable(self.segments)
        previous = next(flat)
        for message in flat:
            yield previous
            previous = message
        # counted before the last message leaves, so a status read after the download sees it
        if self.on_done is not None:
            self.on_done(self.moved)
        yield previous


def chain_stream(changes: Sequence[Change]) -> StateStream:
    """The download of consecutive changes, oldest first."""
    moved = Bytes(
        raw_down=sum(c.header.raw_bytes for c in changes), wire_down=sum(c.header.wire_bytes for c in changes)
    )
    return StateStream([c.messages() for c in changes], moved)


class StateCache:
    """Encodes the flat global state per version, keeping only the latest encoding."""

    def __init__(self, zstd_level: int, chunk_elements: int) -> None:
        self._level = zstd_level
        self._chunk_elements = min(chunk_elements, tensors.MAX_CHUNK_RAW_BYTES // 4)
        self._lock = threading.Lock()
        self._latest: Encoded | None = None

    def encoded(self, state: np.ndarray, version: int, specs: tuple[tuple[int, int, bool], ...]) -> Encoded:
        """The encoding of `state` (float32, flat) at `version`, built on first use."""
        with self._lock:
            if self._latest is not None and self._latest.version == version:
                return self._latest
            parts = fedavg.split(state, [n for _, n, _ in specs])
            encoder = tensors.ChunkEncoder(
                parts,
                pb.ENCODING_FLOAT32,
                pb.COMPRESSION_ZSTD,
                level=self._level,
                chunk_elems=self._chunk_elements,
                ids=[i for i, _, _ in specs],
                exact=[e for _, _, e in specs],
            )
            chunks = list(encoder.chunks())
            self._latest = Encoded(
                version, chunks, encoder.trailer(), encoder.raw_bytes, encoder.wire_bytes,
                tensors.state_sha256(state),
            )
            return self._latest

    def stream(
        self, state: np.ndarray, version: int, specs: tuple[tuple[int, int, bool], ...], unchanged: bool
    ) -> StateStream:
        """The download of the full ``state`` at ``version`` (a header alone when ``unchanged``)."""
        header = pb.StateHeader(
            state_version=version,
            tensors=[pb.TensorSpec(id=i, length=n, exact=e) for i, n, e in specs],
            encoding=pb.ENCODING_FLOAT32,
            compression=pb.COMPRESSION_ZSTD,
            unchanged=unchanged,
        )
        if unchanged:
            return StateStream([[pb.StateChunk(header=header)]])
        enc = self.encoded(state, version, specs)
        header.raw_bytes, header.wire_bytes, header.state_sha256 = enc.raw_bytes, enc.wire_bytes, enc.sha256
        segment = itertools.chain(
            [pb.StateChunk(header=header)],
            (pb.StateChunk(chunk=c) for c in enc.chunks),
            [pb.StateChunk(trailer=enc.trailer)],
        )
        return StateStream([segment], Bytes(raw_down=enc.raw_bytes, wire_down=enc.wire_bytes))
