"""Secure aggregation's RPCs on a real server over mTLS: status codes, messages naming the culprit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fedclient import FINGERPRINT, code_of, upload_messages

from edge_agent.secure import protocol
from edge_agent.secure.session import EdgeSession
from fedocr import retry, secagg
from fedocr.client import Endpoint, FederationClient
from fedocr.v1 import federation_pb2 as pb

C = grpc.StatusCode
LENGTHS = (6, 4)
N = 300  # values of the model in the wire rounds


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


def edge_clients(running, agg_pki, names: list[str]) -> dict[str, FederationClient]:
    policy = retry.RetryPolicy(base_delay=0.05, max_delay=0.2, max_attempts=5)
    return {
        n: FederationClient(Endpoint(f"127.0.0.1:{running.port}", agg_pki.ca, *agg_pki.pair(n)), policy)
        for n in names
    }


def to_unmask(
    clients: dict[str, FederationClient],
) -> tuple[dict[str, EdgeSession], pb.SecureRoundStatus]:
    """Drive every edge through one secure round over the wire, up to the survivors' reveal."""
    sessions = {}
    for name, c in clients.items():
        reply = c.join(N, FINGERPRINT, 0, 0)
        sessions[name] = EdgeSession(name, reply.round_id, protocol.settings_of(reply.plan))
        c.advertise(reply.round_id, *sessions[name].advertisement())
    for name, c in clients.items():
        s = sessions[name]
        status = c.secure_round(s.round_id, pb.SECURE_PHASE_ADVERTISE, 5)
        roster = [(k.edge_id, k.index, k.cipher_public, k.mask_public) for k in status.roster]
        c.share(s.round_id, *s.deal(roster, status.neighbours, status.threshold))
        s.cipher_keys = {e: cp for e, _, cp, _ in roster}
    for name, c in clients.items():
        s = sessions[name]
        status = c.secure_round(s.round_id, pb.SECURE_PHASE_SHARE, 5)
        s.receive(list(status.dealers), [(x.dealer, x.ciphertext) for x in status.sealed], s.cipher_keys)
        masked = s.masked(np.full(N, 0.5, np.float32), 10)
        c.upload(s.round_id, name, masked, 10, FINGERPRINT, 0, 1, pb.ENCODING_MASKED_INT)
    status = clients["edge-1"].secure_round(sessions["edge-1"].round_id, pb.SECURE_PHASE_UPLOAD, 5)
    assert status.phase == pb.SECURE_PHASE_UNMASK
    return sessions, status


def test_a_bad_share_and_a_share_of_another_round_are_refused_naming_dealer_and_holder(
    serve, connect, agg_pki
) -> None:
    running = serve(
        quorum=3, min_edges=3, total_rounds=2, secure_aggregation=True, secagg_max_weight_sum=100.0
    )
    names = ["edge-0", "edge-1", "edge-2"]
    clients = edge_clients(running, agg_pki, names)
    try:
        sessions, status = to_unmask(clients)
        r1 = sessions["edge-1"].round_id
        shares = sessions["edge-1"].reveal(list(status.survivors), list(status.dropped))
        bad = [(d, k, bytes(66) if d == "edge-0" else v) for d, k, v in shares]
        exc = refusal(clients["edge-1"].reveal, r1, bad)
        assert exc.code() == C.INVALID_ARGUMENT
        assert "share from edge-0 held by edge-1 does not match its commitment for round 1" in exc.details()
        for name in names:  # the good shares close the round
            s = sessions[name]
            if clients[name].secure_round(r1, pb.SECURE_PHASE_UPLOAD, 0).phase == pb.SECURE_PHASE_UNMASK:
                clients[name].reveal(r1, s.reveal(list(status.survivors), list(status.dropped)))
        observer = connect(running, "ops")
        closed = observer.get_round(r1)
        assert closed.state == pb.ROUND_STATE_CLOSED, closed.message
        _, state = observer_state(connect(running, "edge-2"))
        assert np.abs(state - 0.5).max() <= 3 * 0.5 / (2.0**closed.plan.secure.frac_bits * 30)

        exc = refusal(clients["edge-1"].reveal, r1, shares)  # round 1 has ended
        assert exc.code() == C.FAILED_PRECONDITION and "round 1 has ended" in exc.details()
        _, status = to_unmask(clients)  # round 2: edge-1 replays its shares of round 1
        r2 = status.round_id
        exc = refusal(clients["edge-1"].reveal, r2, shares)
        assert exc.code() == C.INVALID_ARGUMENT
        assert "held by edge-1 does not match its commitment for round 2" in exc.details()
    finally:
        for c in clients.values():
            c.close()


def observer_state(client) -> tuple[int, np.ndarray]:
    header, arrays = client.download()
    return header.state_version, np.concatenate(arrays)
