"""Quantized downloads with error feedback on the aggregator: a real `aggregator serve` process, the
edge's own wire client (fedocr.client), byte-equal visible states however an edge got there."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest
from fedclient import Client

from aggregator.store import change_key
from aggregator.visible import Change
from fedocr import encodings, harness, retry, tensors
from fedocr.client import Endpoint, FederationClient, read_state
from fedocr.v1 import federation_pb2 as pb

PARAMS, STATS = 200_000, 300
LENGTH = PARAMS + STATS
FINGERPRINT = b"\x42" * 32
ROUNDS = 5


def serve(agg_pki, state_dir: Path, *flags: str) -> harness.Service:
    return harness.start_aggregator(
        agg_pki.dir, state_dir, state_dir.with_suffix(".log"),
        flags=("--log-level", "WARNING", "--quorum", "1", "--min-edges", "1", "--rounds", str(ROUNDS),
               "--download-encoding", "int3", *flags),
    )  # fmt: skip


def edge(agg_pki, port: int, name: str) -> FederationClient:
    cert, key = agg_pki.pair(name)
    policy = retry.RetryPolicy(base_delay=0.1, max_delay=0.5, max_attempts=None, max_elapsed=30.0)
    return FederationClient(Endpoint(f"127.0.0.1:{port}", agg_pki.ca, cert, key), policy)


def increment(seed: int) -> np.ndarray:
    """An edge's update of one round: parameters of about 1e-2, running statistics near 1."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, 1e-2, PARAMS), rng.normal(1, 0.1, STATS)]).astype(np.float32)


def play_round(client: FederationClient, name: str, seed: int) -> None:
    """Join the open round and upload ``increment(seed)`` in float32."""
    reply = client.join(LENGTH, FINGERPRINT, 0, 5, statistics=STATS)
    assert reply.action == pb.JoinResponse.ACTION_TRAIN, reply
    version = reply.state_version
    client.upload(reply.round_id, name, increment(seed), 1, FINGERPRINT, version, statistics=STATS)


class Holder:
    """What an edge holds: a version and its state, updated by downloads."""

    def __init__(self, client: FederationClient) -> None:
        self.client, self.version, self.state, self.moved = client, 0, None, []

    def sync(self) -> None:
        download = self.client.download(self.version, self.state)
        if download is not None:
            self.version, self.state = download.version, download.vector
            self.moved.append(download.moved)


@pytest.fixture
def aggregators():
    started: list[harness.Service] = []
    yield started
    for service in started:
        service.stop()


def test_edges_that_left_or_just_joined_end_on_the_same_visible_state(agg_pki, tmp_path, aggregators) -> None:
    service = serve(agg_pki, tmp_path / "state")
    aggregators.append(service)
    steady = Holder(edge(agg_pki, service.port, "edge-0"))  # downloads every round
    away = Holder(edge(agg_pki, service.port, "edge-1"))  # downloads in round 1, then only at the end
    steady.client.join(LENGTH, FINGERPRINT, 0, 0, statistics=STATS)
    exact = np.zeros(LENGTH, np.float32)  # the global state: the sum of the rounds' increments
    for k in range(ROUNDS):
        steady.sync()
        if k == 0:
            away.sync()
        play_round(steady.client, "edge-0", seed=k)
        exact += increment(k)
    steady.sync()
    away.sync()
    fresh = Holder(edge(agg_pki, service.port, "edge-2"))
    fresh.sync()

    assert steady.version == away.version == fresh.version == ROUNDS + 1
    assert steady.state.tobytes() == away.state.tobytes() == fresh.state.tobytes()
    # A new edge gets the full state in float32; one a version behind, one change in int3 (the running
    # statistics exact); one further behind, the chain of changes since its version.
    change_bytes = encodings.payload_size(pb.ENCODING_INT3_QUANTIZED, PARAMS) + 4 * STATS
    assert fresh.moved[-1].raw == 4 * LENGTH
    assert [m.raw for m in steady.moved] == [4 * LENGTH] + [change_bytes] * ROUNDS
    assert away.moved[-1].raw == ROUNDS * change_bytes
    assert change_bytes < 4 * LENGTH / 8
    # The visible state tracks the exact one: what int3 dropped is carried into the next change, so
    # the gap stays a fraction of one round's increment (about 0.22 with fitted scales, 0.31 without).
    gap = np.linalg.norm(steady.state[:PARAMS] - exact[:PARAMS])
    assert gap < 0.25 * np.linalg.norm(increment(ROUNDS - 1)[:PARAMS])
    assert not np.array_equal(steady.state, exact)
    np.testing.assert_allclose(steady.state[PARAMS:], exact[PARAMS:], rtol=1e-5)
    # Operators see the download bytes per round, raw and wire, as before.
    rounds = Client(service.port, agg_pki.ca, *agg_pki.pair("ops")).list_rounds().rounds
    assert sum(r.bytes.raw_down for r in rounds) == sum(m.raw for h in (steady, away, fresh) for m in h.moved)


def test_a_killed_aggregator_resumes_with_the_same_visible_state_and_residual(
    agg_pki, tmp_path, aggregators
) -> None:
    """Twin aggregators take the same uploads; one is killed -9 right after a round closed (its change
    encoded) and restarted. Every later download is the same bytes as the twin's."""
    twins = [serve(agg_pki, tmp_path / "never-killed"), serve(agg_pki, tmp_path / "killed")]
    aggregators.extend(twins)
    holders = [Holder(edge(agg_pki, s.port, "edge-0")) for s in twins]
    for h in holders:
        h.client.join(LENGTH, FINGERPRINT, 0, 0, statistics=STATS)
    for k in range(ROUNDS):
        if k == 2:
            twins[1].kill()
            twins[1] = serve(agg_pki, tmp_path / "killed")
            aggregators.append(twins[1])
            holders[1].client.close()
            holders[1].client = edge(agg_pki, twins[1].port, "edge-0")
        for h in holders:
            h.sync()
            play_round(h.client, "edge-0", seed=k)
    for h in holders:
        h.sync()
    late = Holder(edge(agg_pki, twins[1].port, "edge-1"))  # a new edge on the restarted one
    late.sync()

    assert [m.raw for m in holders[0].moved] == [m.raw for m in holders[1].moved]
    assert holders[0].state.tobytes() == holders[1].state.tobytes() == late.state.tobytes()


def test_a_download_whose_bytes_were_altered_is_refused(agg_pki, tmp_path, aggregators) -> None:
    service = serve(agg_pki, tmp_path / "state")
    aggregators.append(service)
    holder = Holder(edge(agg_pki, service.port, "edge-0"))
    holder.client.join(LENGTH, FINGERPRINT, 0, 0, statistics=STATS)
    holder.sync()
    play_round(holder.client, "edge-0", seed=0)
    service.stop()

    # The stored change of version 2 is replaced by another well-formed one (valid chunks and
    # checksum) under the same header: only the state's SHA-256 can tell.
    env = lmdb.open(str(tmp_path / "state"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        stored = Change.from_bytes(bytes(txn.get(change_key(2))))
        encoder = tensors.ChunkEncoder(
            np.split(increment(7), [PARAMS]), pb.ENCODING_INT3_QUANTIZED, ids=[0, 1], exact=[False, True]
        )
        forged = Change(stored.header, tuple(encoder.chunks()), encoder.trailer())
        txn.put(change_key(2), forged.to_bytes())
    env.close()
    service = serve(agg_pki, tmp_path / "state")
    aggregators.append(service)
    client = edge(agg_pki, service.port, "edge-0")

    stream = client._stub.DownloadState(pb.DownloadStateRequest(held_state_version=1))
    with pytest.raises(tensors.StateMismatch, match="built on the held version 1"):
        read_state(stream, 1, holder.state)
    # The edge's download refuses it too, and falls back on the full state, which is right.
    download = client.download(1, holder.state)
    fresh = edge(agg_pki, service.port, "edge-1").download(0, None)
    assert download.version == fresh.version == 2 and download.moved.raw == 4 * LENGTH
    assert download.vector.tobytes() == fresh.vector.tobytes()
    assert tensors.state_sha256(download.vector) == stored.header.state_sha256



def test_a_federation_switches_to_quantized_downloads_at_a_restart(agg_pki, tmp_path, aggregators) -> None:
    service = serve(agg_pki, tmp_path / "state", "--download-encoding", "float32")
    aggregators.append(service)
    holder = Holder(edge(agg_pki, service.port, "edge-0"))
    holder.client.join(LENGTH, FINGERPRINT, 0, 0, statistics=STATS)
    for k in range(2):
        holder.sync()
        play_round(holder.client, "edge-0", seed=k)
    service.stop()
    service = serve(agg_pki, tmp_path / "state")  # int3 from here on
    aggregators.append(service)
    holder.client.close()
    holder.client = edge(agg_pki, service.port, "edge-0")
    for k in range(2, 4):
        holder.sync()
        play_round(holder.client, "edge-0", seed=k)
    holder.sync()
    fresh = Holder(edge(agg_pki, service.port, "edge-1"))
    fresh.sync()

    change_bytes = encodings.payload_size(pb.ENCODING_INT3_QUANTIZED, PARAMS) + 4 * STATS
    # Full float32 states before the switch; after it, the state held at the switch is the visible
    # state, so the edge goes on with changes.
    assert [m.raw for m in holder.moved] == [4 * LENGTH] * 3 + [change_bytes] * 2
    assert holder.version == fresh.version == 5
    assert holder.state.tobytes() == fresh.state.tobytes()
