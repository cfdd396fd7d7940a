"""Every bad input gets its specific status and leaves the round's sum and the state unchanged."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from fedclient import Client, code_of, upload_messages

from fedocr import encodings
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

C = grpc.StatusCode
LENGTHS = [6, 4]


def ones(scale: float = 1.0) -> list[np.ndarray]:
    return [np.full(n, scale, dtype=np.float32) for n in LENGTHS]


@pytest.fixture
def fed(serve, connect):
    """A server with quorum 3 and round 1 open, edge-0 already counted with an increment of ones."""
    running = serve(quorum=3, min_edges=3, max_chunk_bytes=4096)
    a = connect(running, "edge-0")
    round_id = a.join(LENGTHS).round_id
    a.upload(round_id, ones(), samples=1)
    return running, round_id


def check_unchanged_then_close(running, connect, round_id: int) -> None:
    """The round still holds edge-0 only; two clean uploads close it to the exact mean."""
    observer = connect(running, "ops")
    status = observer.get_round()
    assert status.round_id == round_id and status.state == pb.ROUND_STATE_OPEN
    assert [e.edge_id for e in status.edges if e.uploaded] == ["edge-0"]
    for name in ("edge-10", "edge-11"):
        c = connect(running, name)
        c.join(LENGTHS)
        c.upload(round_id, ones(4.0), samples=1)
    _, state = connect(running, "edge-10").download()
    np.testing.assert_array_equal(state[0], np.full(6, 3.0, dtype=np.float32))  # (1 + 4 + 4) / 3


def tampered(round_id: int, edit, encoding: int = pb.ENCODING_FLOAT32, **kw) -> list[pb.UploadMessage]:
    messages = upload_messages(round_id, ones(9.0), samples=5, encoding=encoding, **kw)
    edit(messages)
    return messages


ENCODINGS = list(encodings.NAMES.values())  # float32, float16, then the quantized ones


@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: pb.Encoding.Name(e))
def test_stream_refusals(fed, connect, enc: int) -> None:
    running, r = fed
    b = connect(running, "edge-1")
    b.join(LENGTHS)

    def chunk_payload(m):
        m[1].chunk.payload = m[1].chunk.payload[:-3]

    def bad_sum(m):
        m[-1].trailer.sha256 = b"\0" * 32

    def encoding(m):
        m[0].header.encoding = pb.ENCODING_MASKED_INT

    def unknown_encoding(m):
        m[0].header.encoding = 99

    def round_ahead(m):
        m[0].header.round_id = r + 5

    def fingerprint(m):
        m[0].header.fingerprint = b"\x22" * 32

    def truncated(m):
        del m[-1]

    def missing_chunk(m):
        del m[2]
        m[-1].trailer.chunk_count = 1

    def no_header(m):
        del m[0]

    cases = {
        "corrupt zstd payload": (chunk_payload, C.INVALID_ARGUMENT),
        "bad checksum": (bad_sum, C.INVALID_ARGUMENT),
        "reserved encoding": (encoding, C.INVALID_ARGUMENT),
        "unknown encoding": (unknown_encoding, C.INVALID_ARGUMENT),
        "unknown round": (round_ahead, C.NOT_FOUND),
        "wrong fingerprint": (fingerprint, C.PERMISSION_DENIED),
        "truncated stream": (truncated, C.INVALID_ARGUMENT),
        "missing chunk": (missing_chunk, C.INVALID_ARGUMENT),
        "no header": (no_header, C.INVALID_ARGUMENT),
    }
    for name, (edit, code) in cases.items():
        assert code_of(b.send, tampered(r, edit, enc)) == code, name
    nan, inf = ones(), ones()
    nan[0][2], inf[1][0] = np.nan, np.inf
    assert code_of(b.upload, r, nan, encoding=enc) == C.INVALID_ARGUMENT
    assert code_of(b.upload, r, inf, encoding=enc) == C.INVALID_ARGUMENT
    one_tensor = [np.ones(6, dtype=np.float32)]
    assert code_of(b.upload, r, one_tensor, encoding=enc) == C.INVALID_ARGUMENT  # tensor count
    too_long = [np.ones(7, np.float32), np.ones(4, np.float32)]
    assert code_of(b.upload, r, too_long, encoding=enc) == C.INVALID_ARGUMENT
    assert code_of(b.upload, r, ones(), samples=0, encoding=enc) == C.INVALID_ARGUMENT  # weighting
    assert code_of(b.upload, r, ones(), base_state_version=7, encoding=enc) == C.FAILED_PRECONDITION
    check_unchanged_then_close(running, connect, r)


@pytest.mark.parametrize("enc", ENCODINGS[2:], ids=lambda e: pb.Encoding.Name(e))
def test_quantized_payload_refusals_name_the_fault(fed, connect, enc: int) -> None:
    running, r = fed
    b = connect(running, "edge-1")
    b.join(LENGTHS)

    def scale(value: float):
        def edit(m):
            m[1].chunk.payload = np.float32(value).tobytes() + m[1].chunk.payload[4:]

        return edit

    def extra_block(m):
        m[1].chunk.payload += bytes(4)

    def int2_code_past_the_end(m):  # 3 values: the last code slot of the one code byte is padding
        payload = bytearray(m[1].chunk.payload)
        payload[-1] |= 0x40
        m[1].chunk.payload = bytes(payload)

    def nibble_past_the_end(m):  # tensor 0 has 6 values in chunks of 3: an odd count
        payload = bytearray(m[1].chunk.payload)
        payload[-1] |= 0x10
        m[1].chunk.payload = bytes(payload)

    cases = {
        "NaN scale": (scale(np.nan), "scale of block 0 is nan"),
        "negative scale": (scale(-1.0), "scale of block 0 is -1.0"),
        "a block too many": (extra_block, "1 scale blocks of 256"),
    }
    if enc == pb.ENCODING_INT4_QUANTIZED:
        cases["nibble past the end"] = (nibble_past_the_end, "nibble after value 2 has bit 0 set")
    if enc == pb.ENCODING_INT2_QUANTIZED:
        cases["code past the end"] = (int2_code_past_the_end, "2-bit code after value 2 has bit 0 set")
    for name, (edit, message) in cases.items():
        messages = tampered(r, edit, enc, compression=pb.COMPRESSION_NONE, chunk_elems=3)
        with pytest.raises(grpc.RpcError) as err:
            b.send(messages)
        assert err.value.code() == C.INVALID_ARGUMENT, name
        assert message in err.value.details(), (name, err.value.details())
    check_unchanged_then_close(running, connect, r)


def test_encodings_outside_the_accepted_ones_are_refused(serve, connect) -> None:
    running = serve(quorum=2, min_edges=2, accept_encodings=("float32", "int8"))
    a = connect(running, "edge-0")
    r = a.join(LENGTHS).round_id
    with pytest.raises(grpc.RpcError) as err:
        a.upload(r, ones(), encoding=pb.ENCODING_INT4_QUANTIZED)
    assert err.value.code() == C.INVALID_ARGUMENT
    assert "int4 is not accepted by this federation (accepted: float32, int8)" in err.value.details()
    a.upload(r, ones(2.0), encoding=pb.ENCODING_INT8_QUANTIZED)
    assert connect(running, "ops").get_round().edges[0].uploaded


def test_a_leaf_sum_adds_as_it_is_and_only_leaves_send_sums(serve, connect) -> None:
    running = serve(quorum=2, min_edges=2)
    leaf, edge = connect(running, "leaf-0"), connect(running, "edge-0")
    r = leaf.join(LENGTHS).round_id
    edge.join(LENGTHS)
    with pytest.raises(grpc.RpcError) as err:
        leaf.upload(r, ones(), samples=2)
    assert err.value.code() == C.INVALID_ARGUMENT
    assert "a leaf aggregator forwards its edges' sum in ENCODING_FLOAT64, not float32" in err.value.details()
    assert code_of(leaf.upload, r, ones(), samples=0, encoding=pb.ENCODING_FLOAT64) == C.INVALID_ARGUMENT
    assert code_of(edge.upload, r, ones(), encoding=pb.ENCODING_FLOAT64) == C.INVALID_ARGUMENT
    assert not [e for e in connect(running, "ops").get_round().edges if e.uploaded]
    # the leaf's edges: 1 sample of ones and 2 of fours, summed weighted (9) with their weight (3)
    summed = [np.full(n, 9.0, dtype=np.float64) for n in LENGTHS]
    assert leaf.upload(r, summed, samples=3, encoding=pb.ENCODING_FLOAT64).committed_edges == 1
    edge.upload(r, ones(-1.0), samples=1)
    _, state = edge.download()
    np.testing.assert_array_equal(state[0], np.full(6, 2.0, dtype=np.float32))  # (9 - 1) / (3 + 1)
    counted = {e.edge_id: e.samples for e in connect(running, "ops").get_round(r).edges}
    assert counted == {"leaf-0": 3, "edge-0": 1}


def test_a_secure_federation_takes_no_leaves(serve, connect) -> None:
    running = serve(quorum=3, min_edges=3, secure_aggregation=True)
    with pytest.raises(grpc.RpcError) as err:
        connect(running, "leaf-0").join(LENGTHS)
    assert err.value.code() == C.FAILED_PRECONDITION
    assert "runs secure aggregation: it takes no leaf aggregators" in err.value.details()


def test_second_upload_and_late_upload(fed, connect) -> None:
    running, r = fed
    a = connect(running, "edge-0")
    assert code_of(a.upload, r, ones(5.0)) == C.ALREADY_EXISTS
    check_unchanged_then_close(running, connect, r)
    late = connect(running, "edge-1")
    assert code_of(late.upload, r, ones(5.0)) == C.FAILED_PRECONDITION  # round r closed
    assert late.join(LENGTHS).round_id == r + 1


def test_oversized_chunk(serve, connect) -> None:
    running = serve(quorum=2, min_edges=2, max_chunk_bytes=4096)
    a = connect(running, "edge-0")
    r = a.join([2000]).round_id
    # 2000 float32 in one chunk = 8000 bytes, over the 4096-byte limit
    assert code_of(a.upload, r, [np.ones(2000, np.float32)], chunk_elems=2000) == C.RESOURCE_EXHAUSTED
    assert a.upload(r, [np.ones(2000, np.float32)], chunk_elems=1000).committed_edges == 1


def test_roles_and_manifests(fed, connect, agg_pki) -> None:
    running, r = fed
    observer = connect(running, "ops")
    assert code_of(observer.upload, r, ones()) == C.PERMISSION_DENIED
    assert code_of(observer.join, LENGTHS) == C.PERMISSION_DENIED
    assert code_of(observer.download) == C.PERMISSION_DENIED
    assert observer.list_rounds().rounds[0].round_id == r
    b = connect(running, "edge-1")
    assert code_of(b.join, LENGTHS, fingerprint=b"\x33" * 32) == C.PERMISSION_DENIED
    assert code_of(b.join, [6, 5]) == C.PERMISSION_DENIED
    assert code_of(b.get_round, 99) == C.NOT_FOUND
    check_unchanged_then_close(running, connect, r)


def test_plaintext_and_foreign_ca_refused(fed, connect, agg_pki, test_pki) -> None:
    running, r = fed
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.FederationStub(channel)
        assert code_of(stub.GetRound, pb.GetRoundRequest(), timeout=5) == C.UNAVAILABLE
    foreign = Client(running.port, agg_pki.ca, *test_pki.foreign_pair)
    try:
        assert code_of(foreign.upload, r, ones()) == C.UNAVAILABLE
        assert code_of(foreign.get_round) == C.UNAVAILABLE
    finally:
        foreign.close()
    check_unchanged_then_close(running, connect, r)


def test_upload_bound_waits_then_refuses(serve, connect) -> None:
    running = serve(quorum=3, min_edges=3, max_concurrent_uploads=1, upload_wait_s=0.3)
    a, b = connect(running, "edge-0"), connect(running, "edge-1")
    r = a.join(LENGTHS).round_id
    b.join(LENGTHS)
    messages = upload_messages(r, ones(), chunk_elems=3)
    started, release = threading.Event(), threading.Event()

    def stalled():
        yield from messages[:2]
        started.set()
        release.wait(10)
        yield from messages[2:]

    holder = threading.Thread(target=lambda: a.send(stalled()))
    holder.start()
    assert started.wait(5)
    time.sleep(0.2)
    assert code_of(b.upload, r, ones()) == C.RESOURCE_EXHAUSTED  # waited 0.3 s for the one slot
    release.set()
    holder.join(10)
    assert b.upload(r, ones()).committed_edges == 2  # the slot is free again
