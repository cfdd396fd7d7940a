"""The gRPC fault corpus: every bad request gets its exact status and leaves the federation as it was.

Each case runs against a federation in the middle of round 2 (round 1 closed, edge-0 counted in
round 2), makes one bad request and names the status it must get. `Fed.assert_unchanged_and_close`
then checks the round, the committed edges and the global state are as before, lets the offender
(edge-1) and edge-2 upload, and checks the new global state is exactly the FedAvg of the three
good increments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import zstandard
from fedclient import FINGERPRINT, Client, code_of, manifest, upload_messages

from aggregator.coordinator import MAX_MODEL_VALUES
from aggregator.server import Running
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

C = grpc.StatusCode
OK = C.OK
LENGTHS = (1500, 40)
CHUNK = 512  # values per chunk in good uploads: tensor 0 in 3 chunks, tensor 1 in 1
MAX_CHUNK_BYTES = 4096
UPLOAD = "/fedocr.v1.Federation/UploadIncrement"
JOIN = "/fedocr.v1.Federation/Join"
DOWNLOAD = "/fedocr.v1.Federation/DownloadState"


def increment(value: float) -> list[np.ndarray]:
    """A small integer-valued increment: FedAvg of these with weights summing to 4 is exact."""
    return [(value + np.arange(n) % 5).astype(np.float32) for n in LENGTHS]


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass
class Fed:
    """A federation in round 2 with edge-0's increment committed, and what it must look like."""

    running: Running
    connect: Callable[..., Client]
    pki: Any  # conftest.FaultPki
    round_id: int = 0
    version: int = 0
    state: list[np.ndarray] = field(default_factory=list)  # global state at `version`
    committed: list[tuple[float, list[np.ndarray]]] = field(default_factory=list)
    replay: list[pb.UploadMessage] = field(default_factory=list)  # edge-0's acknowledged stream
    _clients: dict[str, Client] = field(default_factory=dict)

    def client(self, name: str) -> Client:
        """One client per certificate name."""
        if name not in self._clients:
            self._clients[name] = self.connect(self.running, name)
        return self._clients[name]

    def messages(self, value: float = 3.0, samples: int = 1, **kw) -> list[pb.UploadMessage]:
        """A well-formed upload stream for the open round (tamper with it in a case)."""
        kw.setdefault("chunk_elems", CHUNK)
        return upload_messages(self.round_id, increment(value), samples, **kw)

    def upload(self, name: str, value: float, samples: int) -> pb.UploadReceipt:
        """A good upload by `name`; recorded as acknowledged."""
        client = self.client(name)
        assert client.join(LENGTHS).action == pb.JoinResponse.ACTION_TRAIN
        stream = self.messages(value, samples)
        receipt = client.send(stream)
        assert receipt.sha256 == stream[-1].trailer.sha256
        self.committed.append((float(samples), increment(value)))
        if name == "edge-0":
            self.replay = stream
        return receipt

    def expected_state(self) -> list[np.ndarray]:
        """state + sum(w * dW) / sum(w) over the acknowledged increments (exact for these values)."""
        weight = sum(w for w, _ in self.committed)
        return [s + sum(w * inc[k] for w, inc in self.committed) / weight for k, s in enumerate(self.state)]

    def download(self) -> tuple[int, list[np.ndarray]]:
        header, arrays = self.client("edge-3").download()
        return header.state_version, arrays

    def close_round(self) -> None:
        """Round `round_id` closes with edge-0 (value 8), edge-1 (value 4) and edge-2 (value -6, x2)."""
        self.upload("edge-1", 4.0, 1)
        receipt = self.upload("edge-2", -6.0, 2)
        assert receipt.committed_edges == 3 and receipt.round_state == pb.ROUND_STATE_CLOSED
        expected = self.expected_state()
        version, arrays = self.download()
        assert version == self.version + 1
        for got, want in zip(arrays, expected, strict=True):
            np.testing.assert_array_equal(got, want.astype(np.float32))
        self.round_id, self.version, self.state, self.committed = self.round_id + 1, version, arrays, []

    def assert_unchanged_and_close(self) -> None:
        """Round, committed edges, byte counts and state as before the bad request; then close it."""
        status = self.client("ops").get_round()
        assert (status.round_id, status.state, status.state_version) == (
            self.round_id,
            pb.ROUND_STATE_OPEN,
            self.version,
        )
        uploaded = [(e.edge_id, e.samples, e.bytes.raw_up) for e in status.edges if e.uploaded]
        assert uploaded == [("edge-0", 1, 4 * sum(LENGTHS))]
        assert self.client("ops").list_rounds().state_version == self.version
        version, arrays = self.download()
        assert version == self.version
        for got, want in zip(arrays, self.state, strict=True):
            np.testing.assert_array_equal(got, want)
        self.close_round()
        closed = self.client("ops").get_round(self.round_id - 1)
        assert closed.state == pb.ROUND_STATE_CLOSED
        assert [e.edge_id for e in closed.edges if e.uploaded] == ["edge-0", "edge-1", "edge-2"]


@pytest.fixture
def fed(serve, connect, fault_pki) -> Fed:
    """Round 1 closed (edge-0 +2, edge-1 +4, edge-2 -2 x2), round 2 open with edge-0's +8 counted."""
    running = serve(quorum=3, min_edges=3, total_rounds=4, max_chunk_bytes=MAX_CHUNK_BYTES)
    f = Fed(running, connect, fault_pki)
    assert f.client("edge-0").join(LENGTHS).round_id == 1
    f.round_id, f.version, f.state = 1, 1, [np.zeros(n, np.float32) for n in LENGTHS]
    f.upload("edge-0", 2.0, 1)
    f.close_round()
    f.upload("edge-0", 8.0, 1)
    return f


# -- the cases: each makes one bad request and returns the status it got --------------------------


def raw_upload(f: Fed, raws: list[bytes], name: str = "edge-1") -> C:
    call = f.client(name).channel.stream_unary(UPLOAD, _identity, _identity)
    return code_of(call, iter(raws), timeout=10)


def raw_unary(f: Fed, method: str, raw: bytes, name: str = "edge-1") -> C:
    call = f.client(name).channel.unary_unary(method, _identity, _identity)
    return code_of(call, raw, timeout=10)


def raw_download(f: Fed, raw: bytes) -> C:
    call = f.client("edge-1").channel.unary_stream(DOWNLOAD, _identity, _identity)
    return code_of(lambda: list(call(raw, timeout=10)))


def tampered(f: Fed, edit: Callable[[list[pb.UploadMessage]], object], name: str = "edge-1", **kw) -> C:
    """Send edge `name`'s good stream after `edit` changed it in place."""
    messages = f.messages(**kw)
    edit(messages)
    return code_of(f.client(name).send, messages)


def edited(edit: Callable[[list[pb.UploadMessage]], object], **kw) -> Callable[[Fed], C]:
    """Case: edge-1's good stream (built with `kw`) changed by `edit`."""
    return lambda f: tampered(f, edit, **kw)


def header(**fields) -> Callable[[Fed], C]:
    """Case: edge-1's stream with header fields set; a callable value gets the Fed."""

    def case(f: Fed) -> C:
        def edit(m: list[pb.UploadMessage]) -> None:
            for name, value in fields.items():
                setattr(m[0].header, name, value(f) if callable(value) else value)

        return tampered(f, edit)

    return case


def chunk(k: int, **fields) -> Callable[[Fed], C]:
    """Case: edge-1's stream with fields of message `k` (a chunk) set."""

    def edit(m: list[pb.UploadMessage]) -> None:
        for name, value in fields.items():
            setattr(m[k].chunk, name, value)

    return edited(edit)


def trailer(**fields) -> Callable[[Fed], C]:
    """Case: edge-1's stream with trailer fields set."""

    def edit(m: list[pb.UploadMessage]) -> None:
        for name, value in fields.items():
            setattr(m[-1].trailer, name, value)

    return edited(edit)


def value_at(tensor: int, index: int, value: float) -> Callable[[Fed], C]:
    """Case: a well-formed stream of an increment holding `value` at one element."""

    def case(f: Fed) -> C:
        arrays = increment(3.0)
        arrays[tensor][index] = value
        return code_of(f.client("edge-1").send, upload_messages(f.round_id, arrays, chunk_elems=CHUNK))

    return case


def swap(m: list[pb.UploadMessage]) -> None:
    m[1], m[2] = m[2], m[1]


def zero_length_chunk(m: list[pb.UploadMessage]) -> None:
    m.insert(2, pb.UploadMessage(chunk=pb.TensorChunk(tensor_id=0, offset=CHUNK, count=0, seq=1)))


def truncate_zstd(m: list[pb.UploadMessage]) -> None:
    m[1].chunk.payload = m[1].chunk.payload[: len(m[1].chunk.payload) // 2]


def zstd_in_a_raw_stream(m: list[pb.UploadMessage]) -> None:
    m[1].chunk.payload = zstandard.ZstdCompressor().compress(m[1].chunk.payload)


def set_zstd(m: list[pb.UploadMessage]) -> None:
    m[0].header.compression = pb.COMPRESSION_ZSTD


def short_payload(m: list[pb.UploadMessage]) -> None:
    m[1].chunk.payload = m[1].chunk.payload[:-4]  # one value short of the chunk's count


def shaped(lengths: tuple[int, ...]) -> Callable[[Fed], C]:
    """Case: a well-formed upload of tensors of `lengths` (the manifest says LENGTHS)."""

    def case(f: Fed) -> C:
        arrays = [np.ones(n, np.float32) for n in lengths]
        return code_of(f.client("edge-1").send, upload_messages(f.round_id, arrays, chunk_elems=CHUNK))

    return case


def giant_chunk(f: Fed) -> C:
    return code_of(f.client("edge-1").send, f.messages(chunk_elems=1500))  # 6000 bytes > 4096


def negative_samples(f: Fed) -> C:
    """sample_count -1 as a signed varint: uint64 reads it as 2**64 - 1."""
    messages = f.messages()
    header = messages[0].header.SerializeToString() + b"\x10" + b"\xff" * 9 + b"\x01"  # field 2 again
    raw = [b"\x0a" + bytes([len(header)]) + header] + [m.SerializeToString() for m in messages[1:]]
    assert pb.UploadMessage.FromString(raw[0]).header.sample_count == 2**64 - 1
    return raw_upload(f, raw)


def join_with(lengths, fingerprint: bytes = FINGERPRINT, name: str = "edge-1") -> Callable[[Fed], C]:
    def case(f: Fed) -> C:
        return code_of(f.client(name).join, lengths, fingerprint=fingerprint)

    return case


def empty_manifest(f: Fed) -> C:
    return code_of(f.client("edge-1").stub.Join, pb.JoinRequest(), timeout=10)


def replay(f: Fed) -> C:
    return code_of(f.client("edge-0").send, f.replay)


def observer_upload(f: Fed) -> C:
    return code_of(f.client("ops").send, f.messages())


def observer_download(f: Fed) -> C:
    return code_of(f.client("ops").download)


def unknown_round_status(f: Fed) -> C:
    return code_of(f.client("ops").get_round, 99)


def peer(name: str) -> Callable[[Fed], C]:
    """An upload and a GetRound from a client with certificate `name`."""

    def case(f: Fed) -> C:
        client = Client(f.running.port, f.pki.ca, *f.pki.pair(name))
        try:
            status = code_of(client.send, f.messages())
            assert code_of(client.get_round) == status
            return status
        finally:
            client.close()

    return case


def plaintext(f: Fed) -> C:
    with grpc.insecure_channel(f"127.0.0.1:{f.running.port}") as channel:
        stub = pb_grpc.FederationStub(channel)
        status = code_of(stub.GetRound, pb.GetRoundRequest(), timeout=5)
        assert code_of(stub.UploadIncrement, iter(f.messages()), timeout=5) == status
        return status


def absurd_wait(f: Fed) -> C:
    """edge-0 (already uploaded) asks to wait 2**32 - 1 s: the 1 s cap answers WAIT."""
    started = time.monotonic()
    request = pb.JoinRequest(manifest=manifest(LENGTHS), wait_seconds=2**32 - 1)
    reply = f.client("edge-0").stub.Join(request, timeout=10)
    assert reply.action == pb.JoinResponse.ACTION_WAIT and time.monotonic() - started < 5
    return OK


def cancelled_mid_stream(f: Fed) -> C:
    """edge-1 sends its header and a chunk, then cancels; its slot and the round are left clean."""
    messages, sent, release = f.messages(), threading.Event(), threading.Event()

    def stalled():
        yield from messages[:2]
        sent.set()
        release.wait(10)

    call = f.client("edge-1").stub.UploadIncrement.future(stalled(), timeout=10)
    assert sent.wait(5)
    time.sleep(0.2)
    call.cancel()
    release.set()
    deadline = time.monotonic() + 5
    while f.running.federation._in_flight and time.monotonic() < deadline:  # the server notices
        time.sleep(0.02)
    return call.code()


INVALID, EXHAUSTED, DENIED = C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.PERMISSION_DENIED
NONE, ZSTD = pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD
CASES = [
    # malformed protobuf on a raw channel
    pytest.param(lambda f: raw_upload(f, [b"\x0a\xff\xff"]), INVALID, id="raw-upload-garbage"),
    pytest.param(
        lambda f: raw_upload(f, [f.messages()[0].SerializeToString(), b"\xff\xff\xff\xff"]),
        INVALID,
        id="raw-upload-header-then-garbage",
    ),
    pytest.param(lambda f: raw_unary(f, JOIN, b"\x0a\x05\x0a"), INVALID, id="raw-join-garbage"),
    pytest.param(lambda f: raw_download(f, b"\x08\xff"), INVALID, id="raw-download-garbage"),
    # the stream's shape
    pytest.param(edited(lambda m: m.pop(0)), INVALID, id="no-header"),
    pytest.param(lambda f: code_of(f.client("edge-1").send, []), INVALID, id="empty-stream"),
    pytest.param(edited(lambda m: m.insert(2, m[0])), INVALID, id="header-twice"),
    pytest.param(edited(swap), INVALID, id="chunks-out-of-order"),
    pytest.param(edited(lambda m: m.insert(2, m[1])), INVALID, id="chunk-twice"),
    pytest.param(chunk(2, offset=0), INVALID, id="chunk-overlap"),
    pytest.param(edited(zero_length_chunk), INVALID, id="zero-length-chunk"),
    pytest.param(giant_chunk, EXHAUSTED, id="chunk-over-max-chunk-bytes"),
    pytest.param(chunk(1, payload=b"\0" * (5 << 20)), EXHAUSTED, id="message-over-grpc-limit"),
    pytest.param(edited(lambda m: m.pop()), INVALID, id="missing-trailer"),
    pytest.param(edited(lambda m: m.append(m[-1])), INVALID, id="trailer-twice"),
    pytest.param(chunk(1, tensor_id=7), INVALID, id="unknown-tensor-id"),
    # encoding and compression
    pytest.param(header(encoding=99), INVALID, id="encoding-unknown"),
    pytest.param(header(encoding=pb.ENCODING_FLOAT16), INVALID, id="encoding-reserved"),
    pytest.param(header(compression=7), INVALID, id="compression-unknown"),
    pytest.param(header(compression=NONE), INVALID, id="compression-zstd-payload-declared-none"),
    pytest.param(edited(set_zstd, compression=NONE), INVALID, id="compression-raw-payload-declared-zstd"),
    pytest.param(edited(zstd_in_a_raw_stream, compression=NONE), INVALID, id="compression-one-chunk-zstd"),
    pytest.param(edited(truncate_zstd), INVALID, id="zstd-payload-truncated"),
    # values
    pytest.param(value_at(0, 700, np.nan), INVALID, id="nan"),
    pytest.param(value_at(1, 39, np.inf), INVALID, id="inf"),
    pytest.param(value_at(1, 0, -np.inf), INVALID, id="minus-inf"),
    # lengths and checksums
    pytest.param(shaped((1500, 39)), INVALID, id="tensor-short-by-one"),
    pytest.param(shaped((1500, 41)), INVALID, id="tensor-long-by-one"),
    pytest.param(shaped((1500,)), INVALID, id="tensor-missing"),
    pytest.param(edited(short_payload, compression=NONE), INVALID, id="payload-short-by-one-value"),
    pytest.param(chunk(1, count=CHUNK + 1), INVALID, id="count-long-by-one"),
    pytest.param(trailer(chunk_count=5), INVALID, id="trailer-chunk-count-off-by-one"),
    pytest.param(trailer(sha256=b"\0" * 32), INVALID, id="trailer-checksum-wrong"),
    # rounds, replays and sample counts
    pytest.param(replay, C.ALREADY_EXISTS, id="replayed-upload"),
    pytest.param(header(round_id=lambda f: f.round_id + 1), C.NOT_FOUND, id="round-unknown"),
    pytest.param(header(round_id=0), C.NOT_FOUND, id="round-zero"),
    pytest.param(header(round_id=1), C.FAILED_PRECONDITION, id="round-closed"),
    pytest.param(header(base_state_version=1), C.FAILED_PRECONDITION, id="stale-base-version"),
    pytest.param(header(sample_count=0), INVALID, id="zero-samples"),
    pytest.param(negative_samples, INVALID, id="negative-samples"),
    # model identity
    pytest.param(header(fingerprint=b"\x22" * 32), DENIED, id="upload-fingerprint"),
    pytest.param(join_with(LENGTHS, b"\x22" * 32), DENIED, id="join-fingerprint"),
    pytest.param(join_with((1500, 41)), DENIED, id="join-manifest-length"),
    pytest.param(join_with((1500, 40, 1)), DENIED, id="join-manifest-extra-tensor"),
    pytest.param(join_with((MAX_MODEL_VALUES + 1,)), DENIED, id="join-giant-manifest"),
    pytest.param(empty_manifest, INVALID, id="join-empty-manifest"),
    pytest.param(absurd_wait, OK, id="join-absurd-wait"),
    # certificates and roles
    pytest.param(join_with(LENGTHS, name="ops"), DENIED, id="observer-join"),
    pytest.param(observer_upload, DENIED, id="observer-upload"),
    pytest.param(observer_download, DENIED, id="observer-download"),
    pytest.param(unknown_round_status, C.NOT_FOUND, id="get-round-unknown"),
    pytest.param(peer("edge-expired"), C.UNAVAILABLE, id="cert-expired"),
    pytest.param(peer("edge-future"), C.UNAVAILABLE, id="cert-not-yet-valid"),
    pytest.param(peer("foreign:edge-1"), C.UNAVAILABLE, id="cert-foreign-ca"),
    pytest.param(peer("roleless"), DENIED, id="cert-without-role"),
    pytest.param(peer("aggregator"), C.UNAVAILABLE, id="cert-server-as-client"),
    pytest.param(plaintext, C.UNAVAILABLE, id="plaintext"),
    pytest.param(cancelled_mid_stream, C.CANCELLED, id="client-cancels-mid-stream"),
]


@pytest.mark.parametrize("case, expected", CASES)
def test_bad_request_gets_its_status_and_changes_nothing(fed: Fed, case, expected: C) -> None:
    assert case(fed) == expected
    fed.assert_unchanged_and_close()


def test_finite_values_that_would_overflow_the_state_are_refused(serve, connect) -> None:
    """Two rounds of large finite increments would push the float32 state to inf: the second is refused."""
    running = serve(quorum=1, min_edges=1, total_rounds=3)
    a = connect(running, "edge-0")
    big = [np.full(n, 2.5e38, np.float32) for n in LENGTHS]
    assert a.upload(a.join(LENGTHS).round_id, big).round_state == pb.ROUND_STATE_CLOSED
    r = a.join(LENGTHS).round_id
    assert code_of(a.upload, r, big) == C.INVALID_ARGUMENT
    assert a.upload(r, [-b for b in big]).round_state == pb.ROUND_STATE_CLOSED  # the edge is not stuck
    header, state = a.download()
    assert header.state_version == 3
    for values in state:
        np.testing.assert_array_equal(values, np.zeros_like(values))


# -- before any model exists: the first Join defines it --------------------------------------------


def fresh_upload(running: Running, client: Client) -> C:
    return code_of(client.send, upload_messages(1, increment(1.0), chunk_elems=CHUNK))


FRESH_CASES = [
    pytest.param(fresh_upload, C.FAILED_PRECONDITION, id="upload-before-any-join"),
    pytest.param(lambda r, c: code_of(c.get_round), C.FAILED_PRECONDITION, id="get-round-before-any-join"),
    pytest.param(lambda r, c: code_of(c.download), C.FAILED_PRECONDITION, id="download-before-any-join"),
    pytest.param(
        lambda r, c: code_of(c.join, [MAX_MODEL_VALUES // 2, MAX_MODEL_VALUES // 2 + 1]),
        C.RESOURCE_EXHAUSTED,
        id="first-manifest-giant",
    ),
    pytest.param(lambda r, c: code_of(c.join, [5, 0]), C.INVALID_ARGUMENT, id="first-manifest-empty-tensor"),
    pytest.param(
        lambda r, c: code_of(c.join, LENGTHS, fingerprint=b""),
        C.INVALID_ARGUMENT,
        id="first-manifest-no-fingerprint",
    ),
    pytest.param(
        lambda r, c: code_of(
            c.stub.Join,
            pb.JoinRequest(
                manifest=pb.Manifest(tensors=[pb.TensorSpec(id=1, length=3)] * 2, fingerprint=FINGERPRINT)
            ),
            timeout=10,
        ),
        C.INVALID_ARGUMENT,
        id="first-manifest-duplicate-id",
    ),
]


@pytest.mark.parametrize("case, expected", FRESH_CASES)
def test_bad_request_before_any_model_registers_nothing(serve, connect, case, expected: C) -> None:
    running = serve(quorum=1, min_edges=1)
    edge = connect(running, "edge-1")
    assert case(running, edge) == expected
    assert code_of(connect(running, "ops").get_round) == C.FAILED_PRECONDITION  # still no round
    assert running.federation.manifest is None
    reply = edge.join(LENGTHS)
    assert (reply.action, reply.round_id, reply.state_version) == (pb.JoinResponse.ACTION_TRAIN, 1, 1)
    header, state = edge.download()
    assert [len(s) for s in state] == list(LENGTHS) and not any(s.any() for s in state)
