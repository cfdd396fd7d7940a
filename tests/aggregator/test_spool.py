"""The upload log: durable uploads as spool files plus LMDB entries, the sum written at checkpoints.

A coordinator dropped without a stop is what a kill -9 leaves on disk (every write is an fsynced
transaction); a new one on the same directory must hold the same float64 sum, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedclient import FINGERPRINT as FP
from fedclient import upload_messages

from aggregator import messages as wire
from aggregator import spool
from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.store import Store
from fedocr.v1 import federation_pb2 as pb

LENGTHS = (700, 300)
EDGES = [f"edge-{k}" for k in range(9)]


def increment(k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(k)
    return [rng.normal(0, 1e-2, n).astype(np.float32) for n in LENGTHS]


def open_federation(state: Path, quorum: int = 7, log_from: int = 0) -> tuple[Store, RoundCoordinator]:
    store = Store(state)
    config = AggregatorConfig(
        state_dir=state, quorum=quorum, min_edges=1, total_rounds=2, deadline_s=3600,
        log_uploads_from_bytes=log_from,
    )
    fed = RoundCoordinator(config, store)
    manifest = wire.manifest_from(
        pb.Manifest(tensors=[pb.TensorSpec(id=i, length=n) for i, n in enumerate(LENGTHS)], fingerprint=FP)
    )
    for name in EDGES:  # those that uploaded before a restart are told to wait
        assert fed.join(name, manifest, 0).action in ("TRAIN", "WAIT")
    return store, fed


def upload(fed: RoundCoordinator, k: int, compression: int = pb.COMPRESSION_ZSTD) -> None:
    messages = upload_messages(1, increment(k), samples=k + 1, compression=compression, chunk_elems=256)
    fed.upload(EDGES[k], iter(messages))


def files(state: Path) -> set[str]:
    return {p.name for p in (state / spool.SPOOL_DIR).iterdir()}


def test_logged_uploads_are_replayed_bit_for_bit_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spool, "CHECKPOINT_FACTOR", 2)  # a checkpoint once the log holds 16 KB
    state = tmp_path / "state"
    store, fed = open_federation(state)
    upload(fed, 0, pb.COMPRESSION_NONE)
    upload(fed, 1)
    assert len(files(state)) == 2  # both durable in the log (4 KB each); the sum was not written
    assert store.load().total is None and len(store.load().log) == 2
    upload(fed, 2)
    upload(fed, 3)  # the log passes 16 KB: a checkpoint writes the sum and folds all four
    assert store.load().total is not None and store.load().log == [] and files(state) == set()
    upload(fed, 4)
    snap = store.load()
    assert [e.file for _, e in snap.log] == sorted(files(state)) and len(snap.log) == 1
    expected = fed._total.copy()
    store.close()  # what kill -9 leaves: nothing is flushed on the way out

    store, fed = open_federation(state)
    assert fed._total.tobytes() == expected.tobytes()
    assert fed.round_status().committed == 5
    upload(fed, 5)
    closing = fed._total.copy()
    store.close()
    store, fed = open_federation(state)
    assert fed._total.tobytes() == closing.tobytes()
    upload(fed, 6)  # the quorum: the round closes, its spool files go
    assert fed.state_version == 2 and files(state) == set()
    flat = fed.global_state()
    weights = np.arange(1, 8, dtype=np.float64)
    expected_mean = sum(w * np.concatenate(increment(k)).astype(np.float64) for k, w in enumerate(weights))
    np.testing.assert_allclose(flat, expected_mean / weights.sum(), rtol=0, atol=1e-7)
    store.close()


def test_refused_and_orphaned_spool_files_are_removed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store, fed = open_federation(state)
    bad = upload_messages(1, increment(0), samples=1)
    bad[-1].trailer.sha256 = b"\0" * 32  # refused at the trailer, after its chunks were spooled
    with pytest.raises(Exception, match="sha256"):
        fed.upload(EDGES[0], iter(bad))
    assert files(state) == set()
    upload(fed, 1)
    kept = files(state)
    store.close()
    (state / spool.SPOOL_DIR / "r000000000001-left-by-a-crash.upl").write_bytes(b"\1" * 10)
    store, fed = open_federation(state)
    assert files(state) == kept
    store.close()


def test_a_damaged_logged_upload_stops_the_start_naming_its_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store, fed = open_federation(state)
    upload(fed, 0)
    store.close()
    (name,) = files(state)
    path = state / spool.SPOOL_DIR / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(spool.SpoolError, match=name):
        open_federation(state)


def test_a_small_sum_is_written_with_every_upload_and_nothing_is_logged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store, fed = open_federation(state, log_from=AggregatorConfig().log_uploads_from_bytes)
    upload(fed, 0)
    upload(fed, 1)
    snap = store.load()
    assert files(state) == set() and snap.log == []
    assert snap.total.tobytes() == fed._total.tobytes() and fed._total.any()
    store.close()
