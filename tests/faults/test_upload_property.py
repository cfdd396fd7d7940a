"""Property: any mutation of a valid upload stream either commits exactly what a reference decoder
reads from it, or gets a specific refusal; and each round's new global state is exactly the FedAvg
of the increments that were acknowledged in it.

One aggregator serves every example (quorum 2); each example is one round: edge-1 uploads a good
increment, edge-0 sends the mutated stream, and edge-2 closes the round if edge-0 was refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import zstandard
from fedclient import FINGERPRINT, Client, upload_messages
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from aggregator.fedavg import FLOAT32_MAX, MAX_SAMPLES
from aggregator.server import Running, start
from fedocr import encodings, tensors
from fedocr.errors import WireFormatError
from fedocr.v1 import federation_pb2 as pb

C = grpc.StatusCode
LENGTHS = (1200, 17)
MAX_CHUNK_BYTES = 4096
GOOD_CHUNK = 512  # values per chunk in the good uploads
REFUSALS = {
    C.INVALID_ARGUMENT,
    C.FAILED_PRECONDITION,
    C.ALREADY_EXISTS,
    C.NOT_FOUND,
    C.RESOURCE_EXHAUSTED,
    C.PERMISSION_DENIED,  # a mutated fingerprint: another federation's model
}
SPECIAL = [np.nan, np.inf, -np.inf, FLOAT32_MAX, -FLOAT32_MAX, 1e38, 1e-45, -0.0]


@dataclass
class World:
    """The shared aggregator and one client per edge."""

    running: Running
    clients: dict[str, Client]

    def sync(self) -> tuple[int, int, np.ndarray]:
        """(open round, state version, flat state); closes a round an earlier failure left half done."""
        status = self.clients["edge-1"].get_round()
        done = {e.edge_id for e in status.edges if e.uploaded}
        if done:
            for name in ("edge-1", "edge-2", "edge-0"):
                if name not in done and status.state == pb.ROUND_STATE_OPEN:
                    self.clients[name].join(LENGTHS)
                    status.state = (
                        self.clients[name]
                        .upload(status.round_id, good(0), chunk_elems=GOOD_CHUNK)
                        .round_state
                    )
            status = self.clients["edge-1"].get_round()
        header, arrays = self.clients["edge-1"].download()
        return status.round_id, header.state_version, np.concatenate(arrays)


@pytest.fixture(scope="module")
def world(fault_pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    config = fault_pki.server_config(
        tmp_path_factory.mktemp("property") / "state",
        quorum=2,
        min_edges=2,
        total_rounds=100_000,
        deadline_s=600.0,
        max_chunk_bytes=MAX_CHUNK_BYTES,
    )
    running = start(config)
    clients = {
        name: Client(running.port, fault_pki.ca, *fault_pki.pair(name))
        for name in ("edge-0", "edge-1", "edge-2")
    }
    clients["edge-1"].join(LENGTHS)
    yield World(running, clients)
    for client in clients.values():
        client.close()
    running.stop(grace=0.5)


def good(seed: int) -> list[np.ndarray]:
    """A well-behaved increment: quarters in [-2, 2]."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(-8, 9, n) / 4).astype(np.float32) for n in LENGTHS]


# -- mutations --------------------------------------------------------------------------------------

KINDS = [
    "drop", "duplicate", "swap", "truncate", "flip", "trim", "pad", "count", "offset", "seq", "tensor",
    "encoding", "compression", "round", "base", "samples", "fingerprint", "sha", "chunk_count", "resign",
]  # fmt: skip
Mutation = tuple[str, int, int, int]


def _chunks(m: list[pb.UploadMessage]) -> list[pb.TensorChunk]:
    return [x.chunk for x in m if x.WhichOneof("kind") == "chunk"]


def _headers(m: list[pb.UploadMessage]) -> list[pb.UploadHeader]:
    return [x.header for x in m if x.WhichOneof("kind") == "header"]


def _trailers(m: list[pb.UploadMessage]) -> list[pb.Trailer]:
    return [x.trailer for x in m if x.WhichOneof("kind") == "trailer"]


def resign(m: list[pb.UploadMessage]) -> None:
    """Recompute the trailer over the chunks as they now are (so data changes reach deeper checks)."""
    headers, trailers = _headers(m), _trailers(m)
    if not headers or not trailers:
        return
    digest = hashlib.sha256()
    for chunk in _chunks(m):
        try:
            raw = chunk.payload
            if headers[0].compression == pb.COMPRESSION_ZSTD:
                raw = zstandard.ZstdDecompressor().decompress(raw)
        except zstandard.ZstdError:
            return
        digest.update(raw)
    trailers[-1].sha256, trailers[-1].chunk_count = digest.digest(), len(_chunks(m))


def mutate(m: list[pb.UploadMessage], mutation: Mutation, version: int) -> list[pb.UploadMessage]:
    """Apply one mutation (kind, i, j, x) to the stream; integers pick targets and amounts."""
    kind, i, j, x = mutation
    n = len(m)
    chunks, headers, trailers = _chunks(m), _headers(m), _trailers(m)
    chunk = chunks[i % len(chunks)] if chunks else None
    if kind == "drop" and n:
        del m[i % n]
    elif kind == "duplicate" and n:
        copy = pb.UploadMessage()
        copy.CopyFrom(m[j % n])
        m.insert(i % (n + 1), copy)
    elif kind == "swap" and n:
        m[i % n], m[j % n] = m[j % n], m[i % n]
    elif kind == "truncate":
        del m[i % (n + 1) :]
    elif kind == "flip" and chunk is not None and chunk.payload:
        payload = bytearray(chunk.payload)
        payload[j % len(payload)] ^= 1 << (x % 8)
        chunk.payload = bytes(payload)
    elif kind == "trim" and chunk is not None:
        chunk.payload = chunk.payload[: max(0, len(chunk.payload) - 1 - x % 4)]
    elif kind == "pad" and chunk is not None:
        chunk.payload += b"\0" * (1 + x % 4)
    elif kind == "count" and chunk is not None:
        chunk.count = max(0, chunk.count + x % 3 - 1) if x % 5 else 0
    elif kind == "offset" and chunk is not None:
        chunk.offset = max(0, chunk.offset + x % 3 - 1)
    elif kind == "seq" and chunk is not None:
        chunk.seq = x % 6
    elif kind == "tensor" and chunk is not None:
        chunk.tensor_id = x % 3  # 2 is not in the manifest
    elif kind == "encoding" and headers:
        headers[0].encoding = x % 6
    elif kind == "compression" and headers:
        headers[0].compression = x % 4
    elif kind == "round" and headers:
        headers[0].round_id = max(0, headers[0].round_id + x % 5 - 2)
    elif kind == "base" and headers:
        headers[0].base_state_version = (0, version, version - 1, version + 1)[x % 4]
    elif kind == "samples" and headers:
        headers[0].sample_count = (0, 1, 7, MAX_SAMPLES, MAX_SAMPLES + 1, 2**64 - 1)[x % 6]
    elif kind == "fingerprint" and headers:
        headers[0].fingerprint = bytes([x % 256]) * 32
    elif kind == "sha" and trailers:
        sha = bytearray(trailers[-1].sha256 or b"\0")
        sha[j % len(sha)] ^= 1 << (x % 8)
        trailers[-1].sha256 = bytes(sha)
    elif kind == "chunk_count" and trailers:
        trailers[-1].chunk_count = max(0, trailers[-1].chunk_count + x % 3 - 1)
    elif kind == "resign":
        resign(m)
    return m


# -- the reference: what the aggregator must accept ------------------------------------------------


@dataclass
class Accepted:
    weight: float
    flat: np.ndarray
    sha256: bytes


def reference(m: list[pb.UploadMessage], round_id: int, version: int, state: np.ndarray) -> Accepted | None:
    """Decode the stream with the codec alone and apply the service's rules; None = must be refused."""
    if not m or m[0].WhichOneof("kind") != "header":
        return None
    h = m[0].header
    if (h.fingerprint, h.round_id) != (FINGERPRINT, round_id) or h.base_state_version not in (0, version):
        return None
    if not 1 <= h.sample_count <= MAX_SAMPLES:
        return None
    if h.encoding in encodings.MASKED_DTYPES:  # masked codes belong to secure aggregation, not run here
        return None
    try:
        assembler = tensors.ChunkAssembler(
            list(enumerate(LENGTHS)), h.encoding, h.compression, MAX_CHUNK_BYTES
        )
        for k, message in enumerate(m[1:], start=2):
            kind = message.WhichOneof("kind")
            if kind == "chunk":
                assembler.add(message.chunk)
            elif kind == "trailer" and k == len(m):
                arrays = assembler.finish(message.trailer)
                tensors.check_finite(arrays)
                flat = np.concatenate(arrays)
                if np.abs(flat.astype(np.float64) + state).max() > FLOAT32_MAX:
                    return None
                return Accepted(float(h.sample_count), flat, assembler.digest())
            else:
                return None
    except WireFormatError:
        return None
    return None


def fedavg(state: np.ndarray, accepted: list[Accepted]) -> np.ndarray:
    """state + sum(w * dW) / sum(w), in the aggregator's float64 order, rounded to float32 once."""
    total = np.zeros(state.size, np.float64)
    for a in accepted:
        total += np.multiply(a.flat, a.weight, dtype=np.float64)
    mean = total / sum(a.weight for a in accepted)
    mean += state
    return mean.astype(np.float32)


stream_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "chunk_elems": st.sampled_from([16, 100, 300, 1024, 1100]),  # 1100 floats: over 4096 bytes
        "compression": st.sampled_from([pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD]),
        "encoding": st.sampled_from(list(encodings.NAMES.values())),  # every upload encoding
        "samples": st.integers(1, 5),
        "special": st.lists(
            st.tuples(st.integers(0, 1), st.integers(0, 1199), st.sampled_from(SPECIAL)), max_size=2
        ),
    }
)
mutations = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 50), st.integers(0, 5000), st.integers(0, 255)),
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=stream_params, changes=mutations)
# Found by a run of this test: a float32 stream relabelled as masked codes (100 % 6 = 4), which only a
# secure-aggregation federation accepts; the reference had decoded it.
@example(
    params={"seed": 0, "chunk_elems": 16, "compression": pb.COMPRESSION_ZSTD, "encoding": pb.ENCODING_FLOAT32,
            "samples": 1, "special": []},
    changes=[("encoding", 0, 0, 100)],
)  # fmt: skip
def test_mutated_upload_commits_exactly_or_is_refused(
    world: World, params: dict, changes: list[Mutation]
) -> None:
    round_id, version, state = world.sync()
    edge0, edge1, edge2 = (world.clients[f"edge-{k}"] for k in range(3))
    first = good(params["seed"] + 1)
    assert edge1.upload(round_id, first, samples=2, chunk_elems=GOOD_CHUNK).committed_edges == 1
    acknowledged = [Accepted(2.0, np.concatenate(first), b"")]

    values = good(params["seed"])
    for tensor, index, value in params["special"]:
        values[tensor][index % LENGTHS[tensor]] = value
    messages = upload_messages(
        round_id,
        values,
        params["samples"],
        compression=params["compression"],
        encoding=params["encoding"],
        chunk_elems=params["chunk_elems"],
    )
    for change in changes:
        messages = mutate(messages, change, version)
    expected = reference(messages, round_id, version, state)

    assert edge0.join(LENGTHS).action == pb.JoinResponse.ACTION_TRAIN
    try:
        receipt, code = edge0.send(messages), C.OK
    except grpc.RpcError as exc:
        receipt, code = None, exc.code()
        assert code in REFUSALS, (code, exc.details())
        assert expected is None, f"refused with {code} {exc.details()}, the reference accepts it"
    event(f"status {code.name}")  # pytest --hypothesis-show-statistics
    if receipt is not None:
        assert expected is not None, "accepted a stream the reference refuses"
        assert receipt.sha256 == expected.sha256 == _trailers(messages)[-1].sha256
        assert receipt.committed_edges == 2 and receipt.round_state == pb.ROUND_STATE_CLOSED
        acknowledged.append(expected)
    else:
        edge2.join(LENGTHS)
        closing = good(params["seed"] + 2)
        assert edge2.upload(round_id, closing, chunk_elems=GOOD_CHUNK).round_state == pb.ROUND_STATE_CLOSED
        acknowledged.append(Accepted(1.0, np.concatenate(closing), b""))

    header, arrays = edge1.download()
    assert header.state_version == version + 1
    np.testing.assert_array_equal(np.concatenate(arrays), fedavg(state, acknowledged))
    closed = edge1.get_round(round_id)
    committed = {e.edge_id for e in closed.edges if e.uploaded}
    assert closed.state == pb.ROUND_STATE_CLOSED
    assert committed == ({"edge-0", "edge-1"} if receipt is not None else {"edge-1", "edge-2"})
