"""DownloadState's payload: the global state encoded once per version and streamed to every edge.

Encoding (zstd at the operator's level) is the costly part of a download, so the chunks of the
latest version are kept; memory stays O(model) whatever the number of edges.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from aggregator import fedavg
from aggregator.rounds import Bytes
from fedocr import tensors
from fedocr.v1 import federation_pb2 as pb


@dataclass
class Encoded:
    """One version of the global state as wire chunks."""

    version: int
    chunks: list[pb.TensorChunk]
    trailer: pb.Trailer
    raw_bytes: int
    wire_bytes: int


@dataclass
class StateStream:
    """A download: the header, then chunks and trailer unless the edge holds this version."""

    header: pb.StateHeader
    encoded: Encoded | None
    on_done: Callable[[Bytes], None] | None = field(default=None)

    def messages(self) -> Iterator[pb.StateChunk]:
        """Yield the StateChunk stream; reports the bytes moved just before the last message."""
        if self.encoded is None:
            self._done(Bytes())
            yield pb.StateChunk(header=self.header)
            return
        yield pb.StateChunk(header=self.header)
        for chunk in self.encoded.chunks:
            yield pb.StateChunk(chunk=chunk)
        # counted before the last message leaves, so a status read after the download sees it
        self._done(Bytes(raw_down=self.encoded.raw_bytes, wire_down=self.encoded.wire_bytes))
        yield pb.StateChunk(trailer=self.encoded.trailer)

    def _done(self, moved: Bytes) -> None:
        if self.on_done is not None:
            self.on_done(moved)


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
            self._latest = Encoded(version, chunks, encoder.trailer(), encoder.raw_bytes, encoder.wire_bytes)
            return self._latest

    def stream(
        self, state: np.ndarray, version: int, specs: tuple[tuple[int, int, bool], ...], unchanged: bool
    ) -> StateStream:
        """A StateStream for one download."""
        tensor_specs = [pb.TensorSpec(id=i, length=n, exact=e) for i, n, e in specs]
        header = pb.StateHeader(
            state_version=version,
            tensors=tensor_specs,
            encoding=pb.ENCODING_FLOAT32,
            compression=pb.COMPRESSION_ZSTD,
            unchanged=unchanged,
        )
        if unchanged:
            return StateStream(header, None)
        enc = self.encoded(state, version, specs)
        header.raw_bytes, header.wire_bytes = enc.raw_bytes, enc.wire_bytes
        return StateStream(header, enc)
