"""Durable aggregator state in LMDB: manifest, global state, the open round's sum and the history.

Every write is one LMDB transaction, committed with fsync (sync=True) before it returns, so a
receipt sent after `commit_upload` survives `kill -9`. An upload's log entry (or the sum that holds
it), weight and committed-edge list move together in one transaction: after a crash either all of
it is there or none of it. The uploads a log entry names are files in the spool directory
(aggregator/spool.py), synced before the transaction that names them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from aggregator import spool
from aggregator.rounds import RoundRecord, edge_from_json
from aggregator.spool import LogEntry
from fedocr.errors import MalformedRequest, ModelMismatch, StorageUnavailable, TooLarge
from fedocr.tensors import spec_tuple

logger = logging.getLogger(__name__)

# The on-disk format: key names, defined once here (writer and reader).
KEY_FORMAT = b"format"
FORMAT_VERSION = b"fedocr-aggregator/3"
# Read and upgraded on open: /1 kept the current round's edges inside its record (KEY_ROUND); /2 had
# no upload log (its stored sum held every durable upload, which /3 reads as a log left empty).
UPGRADABLE = (b"fedocr-aggregator/1", b"fedocr-aggregator/2")
KEY_MANIFEST = b"manifest"  # JSON {"tensors": [[id, length, exact], ...], "fingerprint": hex}
KEY_STATE = b"state"  # float32 little-endian, the flat global state G_t
KEY_STATE_VERSION = b"state_version"  # ASCII integer; 1 = the initial zeros
KEY_ROUND = b"round/current"  # JSON RoundRecord of the current round, without its edges
ROUND_EDGE_PREFIX = b"round/edge/"  # JSON EdgeRecord of each edge of the current round, by edge id
KEY_ROUND_SUM = b"round/sum"  # float64 little-endian running weighted sum; absent = zeros
# A plain round's durable uploads not yet in KEY_ROUND_SUM, b"round/log/000000000003": JSON LogEntry of
# each upload's file in the spool directory (aggregator/spool.py); the sum is KEY_ROUND_SUM plus these,
# replayed in key order.
LOG_PREFIX = b"round/log/"
# Secure aggregation: uint32 little-endian sum mod 2^32 of the round's masked uploads; absent = zeros.
# Never a single edge's unmasked vector: masks cancel only in the sum, and only after unmasking.
KEY_MASKED_SUM = b"round/masked_sum"
HISTORY_PREFIX = b"history/"
# A lossy download encoding (aggregator/visible.py): the state edges hold, float32 like KEY_STATE, and
# the encoded changes that lead to it, b"visible/change/000000000007" (a Change's stored bytes).
KEY_VISIBLE = b"visible/state"
# A server optimizer's slots (aggregator/server_opt.py), float32 like KEY_STATE: b"server_opt/m", ...
SLOT_PREFIX = b"server_opt/"
CHANGE_PREFIX = b"visible/change/"
# Secure aggregation's per-edge blobs of one round (SecureRecord.take_blobs), e.g.
# b"secure/000000000004/dealt/edge-1": written once each, with the round record; gone at its end.
SECURE_PREFIX = b"secure/"
LOCK_FILE = "aggregator.lock"
STATE_DTYPE = np.dtype("<f4")
SUM_DTYPE = np.dtype("<f8")
MASKED_DTYPE = np.dtype("<u4")
DEFAULT_MAP_SIZE = 1 << 38  # address space only; the file grows with what is written
# LMDB's reader table (lock.mdb) is written through a shared mapping of a file it only truncates
# to size: on a full disk the first store to an unallocated page is a SIGBUS, not an error.
# Allocating it beforehand turns that into ENOSPC (LMDB uses a larger file as it is: 8 KiB needed).
LMDB_LOCK_FILE = "lock.mdb"
LMDB_LOCK_BYTES = 64 << 10


class StateLocked(RuntimeError):
    """Another process holds the state directory."""


class StateFormatMismatch(RuntimeError):
    """The state directory was written by another, incompatible format version."""


def secure_prefix(round_id: int) -> bytes:
    """The key prefix of a round's secure-aggregation blobs."""
    return SECURE_PREFIX + b"%012d/" % round_id


def _put_record(txn: lmdb.Transaction, record: RoundRecord) -> set[str]:
    """Write the current round's record, the edges changed since its last write and its new
    secure-aggregation blobs; returns the edges written (``_unwritten`` puts them back if the
    transaction does not commit)."""
    txn.put(KEY_ROUND, record.to_json(with_edges=False))
    written, record.dirty = record.dirty, set()
    try:
        for edge_id in written:
            txn.put(ROUND_EDGE_PREFIX + edge_id.encode(), record.edge_json(edge_id))
    except BaseException:
        _unwritten(record, written)  # a put failed: the caller gets no set back to restore
        raise
    if record.secure is not None:
        for name, data in record.secure.take_blobs():
            txn.put(secure_prefix(record.round_id) + name.encode(), data)
    return written


def _unwritten(record: RoundRecord, written: set[str]) -> None:
    """A write of ``record`` did not commit: its edges are still to be written."""
    record.dirty |= written


def _delete_prefix(txn: lmdb.Transaction, prefix: bytes) -> None:
    """Delete every key that starts with ``prefix``."""
    for key in [bytes(k) for k, _ in _prefix(txn, prefix)]:
        txn.delete(key)


def change_key(version: int) -> bytes:
    """The key of the stored change that leads to visible ``version``."""
    return CHANGE_PREFIX + b"%012d" % version


def log_key(seq: int) -> bytes:
    """The key of the upload log's entry ``seq`` (keys sort in the order uploads were added)."""
    return LOG_PREFIX + b"%012d" % seq


def history_key(round_id: int) -> bytes:
    """The key of a finished round's record."""
    return HISTORY_PREFIX + b"%012d" % round_id


@dataclass(frozen=True)
class Manifest:
    """What the aggregator knows of the model: (tensor id, length, exact) and a keyed fingerprint.

    ``exact`` tensors (the running statistics) travel in float32 whatever the plan's encoding.
    """

    tensors: tuple[tuple[int, int, bool], ...]
    fingerprint: bytes

    def __post_init__(self) -> None:
        # (id, length) pairs are read as not exact, so that equal manifests compare equal.
        object.__setattr__(self, "tensors", tuple(spec_tuple(t) for t in self.tensors))

    @property
    def lengths(self) -> list[int]:
        """Tensor lengths in manifest order."""
        return [n for _, n, _ in self.tensors]

    @property
    def size(self) -> int:
        """Total number of values."""
        return sum(self.lengths)

    def check_first(self, max_values: int) -> None:
        """Raise unless this manifest can define the federation's model."""
        ids = [i for i, _, _ in self.tensors]
        if not self.tensors or not self.fingerprint or len(set(ids)) != len(ids) or min(self.lengths) < 1:
            raise MalformedRequest(
                "the first manifest must list unique tensor ids of at least one value and carry a fingerprint"
            )
        if self.size > max_values:
            raise TooLarge(f"manifest of {self.size} values; the aggregator holds at most {max_values}")

    def check_same(self, other: Manifest) -> None:
        """Raise ModelMismatch unless `other` (a later edge's manifest) is this model."""
        if other.fingerprint != self.fingerprint:
            raise ModelMismatch(
                "manifest fingerprint differs from the federation's: this edge's federation key or "
                "model preset is not the one the other edges use"
            )
        if other.tensors != self.tensors:
            raise ModelMismatch(
                f"manifest tensors {other.tensors[:4]} differ from the federation's "
                f"{self.tensors[:4]} under the same fingerprint"
            )

    def to_json(self) -> bytes:
        """Serialise to JSON."""
        return json.dumps({"tensors": self.tensors, "fingerprint": self.fingerprint.hex()}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Inverse of to_json; entries stored before the exact flag existed read as not exact."""
        doc = json.loads(data)
        tensors = tuple((int(t[0]), int(t[1]), bool(t[2]) if len(t) > 2 else False) for t in doc["tensors"])
        return cls(tensors, bytes.fromhex(doc["fingerprint"]))


@dataclass
class Snapshot:
    """Everything loaded at start-up."""

    manifest: Manifest | None
    state: np.ndarray | None
    state_version: int
    round: RoundRecord | None
    total: np.ndarray | None
    history: list[RoundRecord]
    masked: np.ndarray | None = None
    visible: np.ndarray | None = None  # None: edges see the global state itself
    changes: dict[int, bytes] = field(default_factory=dict)  # visible version -> its stored change
    slots: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's, by name
    log: list[tuple[int, LogEntry]] = field(default_factory=list)  # uploads not in ``total``, in order


class Store:
    """The LMDB environment under `state_dir`; one per process, opened once."""

    def __init__(self, state_dir: Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir
        # One aggregator per state directory: LMDB would let a second process write too.
        self._lock = open(state_dir / LOCK_FILE, "a+b")  # held for the store's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateLocked(f"{state_dir} is in use by another aggregator process") from None
        try:
            _allocate(state_dir / LMDB_LOCK_FILE, LMDB_LOCK_BYTES)
            self._env = lmdb.open(str(state_dir), map_size=map_size, sync=True, metasync=True, max_dbs=0)
        except (OSError, lmdb.Error) as exc:
            self._release()
            raise self.unwritable("cannot open", exc) from exc
        try:
            with self._write() as txn:
                found = txn.get(KEY_FORMAT)
                if found is None or found in UPGRADABLE:  # load() reads either round layout
                    txn.put(KEY_FORMAT, FORMAT_VERSION)
                elif found != FORMAT_VERSION:
                    raise StateFormatMismatch(
                        f"{state_dir} holds state format {found!r}, expected {FORMAT_VERSION!r}"
                    )
            self.spool = spool.spool_dir(state_dir)
            self.spool.mkdir(exist_ok=True)
            with self._env.begin(buffers=True) as txn:
                named = {LogEntry.from_json(bytes(v)).file for _, v in _prefix(txn, LOG_PREFIX)}
            spool.remove_unreferenced(self.spool, named)
        except OSError as exc:
            self.close()
            raise self.unwritable("cannot open", exc) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the environment and release the directory."""
        self._env.close()
        self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def unwritable(self, what: str, exc: BaseException) -> StorageUnavailable:
        """The error for a failed open or write: names the directory, the cause and the free space."""
        try:
            st = os.statvfs(self.path)
            free = f"; {st.f_bavail * st.f_frsize} bytes free there"
        except OSError:
            free = ""
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return StorageUnavailable(f"{what} the aggregator state in {self.path}: {cause}{free}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction, committed on exit; LMDB errors become StorageUnavailable."""
        try:
            with self._env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as exc:
            raise self.unwritable("cannot write", exc) from exc

    def load(self) -> Snapshot:
        """Read the durable state (copies out of the map, so nothing stays pinned)."""
        with self._env.begin(buffers=True) as txn:
            raw = txn.get(KEY_MANIFEST)
            manifest = Manifest.from_json(bytes(raw)) if raw is not None else None
            state = _array(txn.get(KEY_STATE), STATE_DTYPE)
            total = _array(txn.get(KEY_ROUND_SUM), SUM_DTYPE)
            version = txn.get(KEY_STATE_VERSION)
            rnd = txn.get(KEY_ROUND)
            history = [RoundRecord.from_json(bytes(v)) for _, v in _prefix(txn, HISTORY_PREFIX)]
            edges = [edge_from_json(bytes(v)) for _, v in _prefix(txn, ROUND_EDGE_PREFIX)]
            current = RoundRecord.from_json(bytes(rnd), edges) if rnd is not None else None
            if current is not None and current.secure is not None:
                prefix = secure_prefix(current.round_id)
                for key, value in _prefix(txn, prefix):
                    current.secure.add_blob(bytes(key)[len(prefix) :].decode(), bytes(value))
            return Snapshot(
                manifest=manifest,
                state=state,
                state_version=int(bytes(version)) if version is not None else 0,
                round=current,
                total=total,
                history=history,
                masked=_array(txn.get(KEY_MASKED_SUM), MASKED_DTYPE),
                visible=_array(txn.get(KEY_VISIBLE), STATE_DTYPE),
                changes={
                    int(bytes(k)[len(CHANGE_PREFIX) :]): bytes(v) for k, v in _prefix(txn, CHANGE_PREFIX)
                },
                slots={
                    bytes(k)[len(SLOT_PREFIX) :].decode(): _array(v, STATE_DTYPE)
                    for k, v in _prefix(txn, SLOT_PREFIX)
                },
                log=[
                    (int(bytes(k)[len(LOG_PREFIX) :]), LogEntry.from_json(bytes(v)))
                    for k, v in _prefix(txn, LOG_PREFIX)
                ],
            )

    def init_model(
        self, manifest: Manifest, state: np.ndarray, version: int, first: RoundRecord, visible: bool = False
    ) -> None:
        """Record the federation's manifest, its zero global state and the first round, at once;
        ``visible``: the visible state too (a lossy download encoding), equal to the state at first."""
        with self._write() as txn:
            txn.put(KEY_MANIFEST, manifest.to_json())
            txn.put(KEY_STATE, _bytes(state, STATE_DTYPE))
            if visible:
                txn.put(KEY_VISIBLE, _bytes(state, STATE_DTYPE))
            _delete_prefix(txn, SLOT_PREFIX)
            txn.put(KEY_STATE_VERSION, b"%d" % version)
            _delete_prefix(txn, ROUND_EDGE_PREFIX)
            _put_record(txn, first)
            txn.delete(KEY_ROUND_SUM)
            _delete_prefix(txn, LOG_PREFIX)
            txn.delete(KEY_MASKED_SUM)

    def reset_visible(self, visible: np.ndarray | None) -> None:
        """Start the visible state over (the download encoding changed): store ``visible`` as it,
        or none at all, and drop every stored change."""
        with self._write() as txn:
            _delete_prefix(txn, CHANGE_PREFIX)
            if visible is None:
                txn.delete(KEY_VISIBLE)
            else:
                txn.put(KEY_VISIBLE, _bytes(visible, STATE_DTYPE))

    def save_round(self, record: RoundRecord) -> None:
        """Persist the current round's record alone (joins, downloads: not tied to the sum)."""
        written: set[str] = set()
        try:
            with self._write() as txn:
                written = _put_record(txn, record)
        except BaseException:
            _unwritten(record, written)
            raise

    def save_history(self, record: RoundRecord) -> None:
        """Rewrite a finished round's record (downloads of the final state are counted there)."""
        with self._write() as txn:
            txn.put(history_key(record.round_id), record.to_json())

    def save_sum(self, record: RoundRecord, total: np.ndarray) -> None:
        """Persist a round's float64 sum with its record, secure or not: a leaf's sum when it hands
        it up (a secure round's exists only once unmasked)."""
        written: set[str] = set()
        try:
            with self._write() as txn:
                txn.put(KEY_ROUND_SUM, _bytes(total, SUM_DTYPE))
                _delete_prefix(txn, LOG_PREFIX)  # the sum holds the logged uploads now
                written = _put_record(txn, record)
        except BaseException:
            _unwritten(record, written)
            raise

    def commit_upload(
        self,
        record: RoundRecord,
        total: np.ndarray | None,
        masked: np.ndarray | None = None,
        log: Sequence[tuple[int, LogEntry]] = (),
    ) -> None:
        """Persist an upload's part of the round (see prepare_upload) with the committed edges."""
        self.prepare_upload(record, total, masked, log)()

    def prepare_upload(
        self,
        record: RoundRecord,
        total: np.ndarray | None,
        masked: np.ndarray | None = None,
        log: Sequence[tuple[int, LogEntry]] = (),
    ) -> Callable[[], None]:
        """Copy the round's record and its new uploads into an open write transaction; return its
        commit (the fsync).

        Group commit: the copy happens under the caller's lock, the returned commit without it.
        A plain round writes either its float64 sum ``total``, which then holds every upload so far
        (the log is emptied), or, with ``total`` None, the ``log`` entries (sequence number, entry)
        of its new uploads, whose spool files the caller synced first. A secure round's record comes
        with ``masked``, its uint32 sum of masked uploads, when that changed (None: the record alone).
        """
        try:
            txn = self._env.begin(write=True)
        except lmdb.Error as exc:
            raise self.unwritable("cannot write", exc) from exc
        written: set[str] = set()
        try:
            if record.secure is None and total is not None:
                txn.put(KEY_ROUND_SUM, _bytes(total, SUM_DTYPE))
                _delete_prefix(txn, LOG_PREFIX)
            elif record.secure is None:
                for seq, entry in log:
                    txn.put(log_key(seq), entry.to_json())
            elif masked is not None:
                txn.put(KEY_MASKED_SUM, _bytes(masked, MASKED_DTYPE))
            written = _put_record(txn, record)
        except BaseException as exc:
            _unwritten(record, written)
            txn.abort()
            if isinstance(exc, lmdb.Error):
                raise self.unwritable("cannot write", exc) from exc
            raise

        def commit() -> None:
            try:
                txn.commit()
            except BaseException as exc:
                _unwritten(record, written)
                txn.abort()
                if isinstance(exc, lmdb.Error):
                    raise self.unwritable("cannot write", exc) from exc
                raise

        return commit

    def finish_round(
        self,
        done: RoundRecord,
        state: np.ndarray | None,
        version: int,
        following: RoundRecord | None,
        visible: tuple[np.ndarray, bytes, Iterable[int]] | None = None,
        slots: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Move a closed/failed round to the history, store the new state, open the next round.

        ``visible``: the new visible state, the stored change that leads to it (at ``version``) and
        the versions of older changes to drop; ``slots``: the server optimizer's new state; both
        written in the same transaction.
        """
        with self._write() as txn:
            for name, slot in (slots or {}).items():
                txn.put(SLOT_PREFIX + name.encode(), _bytes(slot, STATE_DTYPE))
            if visible is not None:
                state_seen, change, dropped = visible
                txn.put(KEY_VISIBLE, _bytes(state_seen, STATE_DTYPE))
                txn.put(change_key(version), change)
                for old in dropped:
                    txn.delete(change_key(old))
            txn.put(history_key(done.round_id), done.to_json())
            _delete_prefix(txn, secure_prefix(done.round_id))  # its shares are of no further use
            if state is not None:
                txn.put(KEY_STATE, _bytes(state, STATE_DTYPE))
            txn.put(KEY_STATE_VERSION, b"%d" % version)
            txn.delete(KEY_ROUND_SUM)
            _delete_prefix(txn, LOG_PREFIX)
            txn.delete(KEY_MASKED_SUM)
            _delete_prefix(txn, ROUND_EDGE_PREFIX)
            if following is not None:
                _put_record(txn, following)
            else:
                txn.delete(KEY_ROUND)


def _allocate(path: Path, size: int) -> None:
    """Make sure the first `size` bytes of `path` have disk blocks (ENOSPC now, not SIGBUS later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _bytes(array: np.ndarray, dtype: np.dtype) -> memoryview:
    """A zero-copy byte view of `array` in the on-disk dtype."""
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"expected a contiguous {dtype} array, got {array.dtype}")
    return memoryview(array).cast("B")


def _array(buf: memoryview | None, dtype: np.dtype) -> np.ndarray | None:
    """Copy a stored buffer into a fresh writable array."""
    return None if buf is None else np.frombuffer(buf, dtype=dtype).copy()


def _prefix(txn: lmdb.Transaction, prefix: bytes):
    """Iterate (key, value) pairs whose key starts with `prefix`."""
    cursor = txn.cursor()
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            break
        yield key, value
