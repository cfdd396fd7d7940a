"""Secure aggregation's RPCs on a real server over mTLS: status codes, messages naming the culprit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fedclient import code_of, upload_messages

from fedocr import secagg
from fedocr.v1 import federation_pb2 as pb

C = grpc.StatusCode
LENGTHS = (6, 4)


def advertise(client, round_id: int, cipher: bytes, mask: bytes) -> pb.SecureRoundStatus:
    request = pb.AdvertiseKeysRequest(round_id=round_id, cipher_public=cipher, mask_public=mask)
    return client.stub.AdvertiseKeys(request, timeout=10)


def refusal(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


def test_a_plain_federation_refuses_the_secure_rpcs_and_masked_uploads(serve, connect) -> None:
    running = serve(quorum=2, min_edges=1)
    a = connect(running, "edge-0")
    round_id = a.join(LENGTHS).round_id
    keys = secagg.generate_keypair().public, secagg.generate_keypair().public
    exc = refusal(advertise, a, round_id, *keys)
    assert exc.code() == C.FAILED_PRECONDITION and "does not run secure aggregation" in exc.details()
    masked = [np.zeros(n, np.uint32) for n in LENGTHS]
    messages = upload_messages(round_id, masked, encoding=pb.ENCODING_MASKED_INT)
    assert code_of(a.send, messages) == C.INVALID_ARGUMENT


def test_a_secure_federation_names_a_replayed_key_and_refuses_plain_uploads(serve, connect) -> None:
    running = serve(quorum=3, min_edges=2, secure_aggregation=True)
    a, b = connect(running, "edge-0"), connect(running, "edge-1")
    joined = a.join(LENGTHS)
    assert joined.plan.secure.enabled and joined.plan.encoding == pb.ENCODING_MASKED_INT
    assert len(joined.plan.secure.round_seed) == 32 and joined.plan.secure.frac_bits == 7
    round_id = joined.round_id
    mine = secagg.generate_keypair().public, secagg.generate_keypair().public
    status = advertise(a, round_id, *mine)
    assert status.phase == pb.SECURE_PHASE_ADVERTISE
    assert advertise(a, round_id, *mine).phase == pb.SECURE_PHASE_ADVERTISE  # a retry is fine
    b.join(LENGTHS)
    exc = refusal(advertise, b, round_id, mine[0], secagg.generate_keypair().public)
    assert exc.code() == C.INVALID_ARGUMENT
    assert "'edge-1' advertised a key already used by edge 'edge-0'" in exc.details()
    exc = refusal(advertise, a, round_id, secagg.generate_keypair().public, mine[1])
    assert exc.code() == C.INVALID_ARGUMENT and "'edge-0' already advertised other keys" in exc.details()
    exc = refusal(advertise, a, round_id + 1, *mine)
    assert exc.code() == C.NOT_FOUND
    plain = upload_messages(round_id, [np.ones(n, np.float32) for n in LENGTHS])
    assert code_of(b.send, plain) == C.FAILED_PRECONDITION
    wait = pb.GetSecureRoundRequest(round_id=round_id, after=pb.SECURE_PHASE_ADVERTISE, wait_seconds=0)
    assert b.stub.GetSecureRound(wait, timeout=10).phase == pb.SECURE_PHASE_ADVERTISE
    observer = connect(running, "ops")
    assert "phase ADVERTISE: 1 edge(s) advertised keys" in observer.get_round().message
    assert any(e.edge_id == "edge-0" and e.bytes.raw_up > 64 for e in observer.get_round().edges)
