"""The upload spool: a plain round's uploads as received, so that the running sum is not rewritten
on every durable write.

While an upload streams, its chunks (encoded and compressed, as they came) are appended to a file
of its own under ``<state_dir>/spool/``. A group commit then makes an upload durable with an fsync
of its file and a small LMDB entry (``LogEntry``: the file, its scale, encoding and checksum),
instead of a copy of the whole float64 sum. The sum itself is written at checkpoints: when the
files logged since the last one hold ``CHECKPOINT_FACTOR`` times the sum's bytes (or
``CHECKPOINT_ENTRIES`` uploads), and whenever a round ends. After a crash the sum is the last
checkpoint plus the logged uploads replayed in the order they were added, which gives the same
float64 sum bit for bit. Secure rounds keep writing their masked sum (they are not spooled).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator import fedavg
from fedocr import tensors
from fedocr.v1 import federation_pb2 as pb

SPOOL_DIR = "spool"
SUFFIX = ".upl"
# The sum is rewritten once the uploads logged since the last write hold this many times its size
# (so its cost is spread over them), or once this many uploads wait in the log.
CHECKPOINT_FACTOR = 4
CHECKPOINT_ENTRIES = 256
# Each chunk: the length (little-endian uint32) of its other fields, serialized as a TensorChunk,
# those bytes, then the payload's length and the payload.
_LENGTH = 4


class SpoolError(RuntimeError):
    """A logged upload cannot be read back (missing or damaged file)."""


@dataclass(frozen=True)
class LogEntry:
    """One durable upload that is in the log, not yet in the stored sum."""

    file: str  # its name under the spool directory
    scale: float  # what its values were multiplied by when added (its weight; 1 for a leaf's sum)
    encoding: int
    compression: int
    chunks: int
    sha256: bytes
    size: int  # the file's bytes

    def to_json(self) -> bytes:
        """Serialise (the stored value of the entry's key)."""
        doc = {
            "file": self.file, "scale": self.scale, "encoding": self.encoding,
            "compression": self.compression, "chunks": self.chunks, "sha256": self.sha256.hex(),
            "size": self.size,
        }
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LogEntry:
        """Inverse of to_json."""
        doc = json.loads(data)
        return cls(
            doc["file"], float(doc["scale"]), int(doc["encoding"]), int(doc["compression"]),
            int(doc["chunks"]), bytes.fromhex(doc["sha256"]), int(doc["size"]),
        )


def spool_dir(state_dir: Path) -> Path:
    """The spool directory of a state directory."""
    return state_dir / SPOOL_DIR


def round_of(name: str) -> int:
    """The round id a spool file name starts with (-1 for a name that is not a spool file's)."""
    head = name.split("-", 1)[0]
    return int(head[1:]) if head.startswith("r") and head[1:].isdigit() and name.endswith(SUFFIX) else -1


class SpoolFile:
    """One upload's chunks, appended as they are accepted; ``sync`` makes them durable."""

    def __init__(self, directory: Path, round_id: int) -> None:
        self.name = f"r{round_id:012d}-{uuid.uuid4().hex}{SUFFIX}"
        self.path = directory / self.name
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0

    def write(self, chunk: pb.TensorChunk) -> None:
        """Append one accepted chunk: its fields but the payload, serialized, then the payload as
        it is (no copy of it is made here)."""
        head = pb.TensorChunk(
            seq=chunk.seq, tensor_id=chunk.tensor_id, offset=chunk.offset, count=chunk.count
        ).SerializeToString()
        payload = memoryview(chunk.payload)
        parts = [_prefix(len(head)) + head + _prefix(len(payload)), payload]
        total = sum(len(part) for part in parts)
        while parts:
            written = os.writev(self._fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if parts and written:
                parts[0] = memoryview(parts[0])[written:]
        self.size += total

    def entry(self, scale: float, encoding: int, compression: int, chunks: int, sha256: bytes) -> LogEntry:
        """The log entry of this (complete) upload."""
        return LogEntry(self.name, scale, encoding, compression, chunks, sha256, self.size)

    def sync(self) -> None:
        """fsync the file's data (the directory entry is synced by ``sync_directory``)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and delete: the upload was refused, lost or folded into a stored sum."""
        self.close()
        self.path.unlink(missing_ok=True)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that files created in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prefix(n: int) -> bytes:
    return n.to_bytes(_LENGTH, "little")


def read_chunks(path: Path) -> Iterator[pb.TensorChunk]:
    """The chunks of a spool file, in order; SpoolError if it is truncated."""
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise SpoolError(f"logged upload {path} cannot be read: {exc.strerror or exc}") from exc
    at = 0

    def take() -> memoryview:
        nonlocal at
        if at + _LENGTH > len(data):
            raise SpoolError(f"logged upload {path} is truncated")
        n = int.from_bytes(data[at : at + _LENGTH], "little")
        if at + _LENGTH + n > len(data):
            raise SpoolError(f"logged upload {path} is truncated")
        at += _LENGTH + n
        return data[at - n : at]

    while at < len(data):
        chunk = pb.TensorChunk.FromString(take())
        chunk.payload = bytes(take())
        yield chunk


def replay(
    directory: Path,
    entries: Sequence[LogEntry],
    specs: Sequence[tuple[int, int, bool]],
    total: np.ndarray,
    max_chunk_bytes: int,
) -> None:
    """Add the logged uploads into ``total`` (float64, flat) in order, as they were added live."""
    lengths = [n for _, n, _ in specs]
    for entry in entries:
        path = directory / entry.file
        assembler = tensors.ChunkAssembler(specs, entry.encoding, entry.compression, max_chunk_bytes)
        try:
            for chunk in read_chunks(path):
                assembler.add(chunk)
            arrays = assembler.finish(pb.Trailer(sha256=entry.sha256, chunk_count=entry.chunks))
        except tensors.WireFormatError as exc:
            raise SpoolError(f"logged upload {path} is damaged: {exc}") from exc
        fedavg.accumulate_tensors(total, arrays, lengths, entry.scale)


def remove(directory: Path, names: Iterable[str]) -> None:
    """Delete spool files (those already gone are fine)."""
    for name in names:
        (directory / name).unlink(missing_ok=True)


def remove_rounds_upto(directory: Path, round_id: int) -> None:
    """Delete the files of rounds up to ``round_id`` (a round that ended: its uploads are in the
    state or were dropped with it)."""
    if directory.is_dir():
        remove(directory, [p.name for p in directory.iterdir() if 0 <= round_of(p.name) <= round_id])


def remove_unreferenced(directory: Path, referenced: set[str]) -> None:
    """Delete spool files no log entry names (uploads refused, lost in a crash, or folded into a
    checkpoint whose deletion a crash interrupted). Only at start-up: nothing streams then."""
    if directory.is_dir():
        remove(directory, [p.name for p in directory.iterdir() if p.name not in referenced])
