"""An edge's checks on what the server tells it in a secure round: each lie (a substituted or
unsigned key, a weak threshold, too few dealers, fewer than three survivors, a split graph, two
survivor lists shown to different edges) is refused before the edge deals, masks or reveals anything."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge_agent.secure.protocol import check_confirmations, check_roster
from edge_agent.secure.session import EdgeSession, SecureProtocolError, SecureSettings
from fedocr import secagg
from fedocr.v1 import federation_pb2 as pb

SETTINGS = SecureSettings(clip=8.0, frac_bits=16, round_seed=b"\x07" * 16, weight_by_samples=True)


def roster(n: int) -> tuple[list[EdgeSession], list[tuple[str, int, bytes, bytes]]]:
    sessions = [EdgeSession(f"edge-{k}", 4, SETTINGS) for k in range(n)]
    return sessions, [(s.edge_id, k + 1, *s.advertisement()) for k, s in enumerate(sessions)]


def test_a_threshold_below_a_majority_of_the_holders_is_refused() -> None:
    sessions, entries = roster(5)  # k = 4: the complete graph, 5 holders per edge
    with pytest.raises(SecureProtocolError, match="threshold 2 is not a majority of this edge's 5 share"):
        sessions[0].deal(entries, 4, 2)
    sessions[1].deal(entries, 4, 3)  # 3 of 5 is a majority


def test_an_edge_does_not_mask_when_too_few_neighbours_dealt() -> None:
    sessions, entries = roster(5)
    me = sessions[0]
    me.deal(entries, 4, 3)
    with pytest.raises(SecureProtocolError, match="only 1 of edge-0's 4 neighbours dealt; 3 share holders"):
        me.receive(["edge-0", "edge-1"], [], {})


def test_an_edge_reveals_nothing_to_survivors_it_cannot_trust() -> None:
    sessions, entries = roster(8)
    me = sessions[0]
    me.deal(entries, 2, 2)  # a ring: 2 neighbours, 3 holders, a majority of 2
    everyone = [s.edge_id for s in sessions]
    me.receive(everyone, [], {})
    ring = secagg.neighbours(everyone, 2, SETTINGS.round_seed)
    left, right = sorted(ring["edge-0"])
    with pytest.raises(SecureProtocolError, match="never dealt"):
        me.reveal(["edge-0", left, "edge-9"], [])
    with pytest.raises(SecureProtocolError, match="share holders survive"):
        me.reveal(["edge-0"] + [e for e in everyone if e not in ("edge-0", left, right)], [left, right])
    # Survivors in two parts of the ring: the server could unmask each part's sum.
    far = next(e for e in everyone if e not in ring["edge-0"] | {"edge-0"} | ring[left] | ring[right])
    with pytest.raises(SecureProtocolError, match="graph is split"):
        alive = ["edge-0", left, right, far]
        me.reveal(alive, [e for e in everyone if e not in alive])
    # Two survivors: each would read the other's update off the published mean.
    with pytest.raises(SecureProtocolError, match="only 2 survivor"):
        me.reveal(["edge-0", left], [e for e in everyone if e not in ("edge-0", left)])
    # The whole ring alive is connected: the edge reveals its survivors' self-mask shares.
    assert [kind for _, kind, _ in me.reveal(everyone, [])] == ["self_seed"]


def signed_roster(test_pki, round_id: int = 4) -> tuple[list[pb.EdgeKeys], x509.Certificate]:
    """Two edges' advertisements as a roster relays them, each signed with its certificate's key."""
    entries = []
    for k in range(2):
        name, session = f"edge-{k}", EdgeSession(f"edge-{k}", round_id, SETTINGS)
        cipher, mask = session.advertisement()
        signature = secagg.sign_advertisement(
            test_pki.key(name).read_bytes(), secagg.advertisement_bytes(round_id, name, cipher, mask)
        )
        der = x509.load_pem_x509_certificate(test_pki.cert(name).read_bytes()).public_bytes(Encoding.DER)
        entries.append(pb.EdgeKeys(edge_id=name, index=k + 1, cipher_public=cipher, mask_public=mask,
                                   signature=signature, certificate=der))
    return entries, x509.load_pem_x509_certificate(test_pki.ca.read_bytes())


def test_signed_advertisements_pass_and_every_substitution_is_caught(test_pki) -> None:
    entries, ca = signed_roster(test_pki)
    check_roster(4, entries, ca)

    swapped = [pb.EdgeKeys(), *entries[1:]]
    swapped[0].CopyFrom(entries[0])
    swapped[0].mask_public = EdgeSession("edge-0", 4, SETTINGS).advertisement()[1]  # the server's own key
    with pytest.raises(secagg.BadSignature, match="advertisement of 'edge-0' is not signed"):
        check_roster(4, swapped, ca)
    with pytest.raises(secagg.BadSignature, match="is not signed"):
        check_roster(5, entries, ca)  # replayed into another round
    renamed = [pb.EdgeKeys(), *entries[1:]]
    renamed[0].CopyFrom(entries[1])
    renamed[0].edge_id = "edge-0"  # edge-1's signed keys passed off as edge-0's
    with pytest.raises(secagg.BadSignature, match="certificate sent for 'edge-0' names"):
        check_roster(4, renamed, ca)
    foreign_cert, foreign_key = test_pki.foreign_pair
    forged = [pb.EdgeKeys(), *entries[1:]]
    forged[0].CopyFrom(entries[0])
    foreign = x509.load_pem_x509_certificate(foreign_cert.read_bytes())
    forged[0].certificate = foreign.public_bytes(Encoding.DER)
    forged[0].signature = secagg.sign_advertisement(foreign_key.read_bytes(), secagg.advertisement_bytes(
        4, "edge-0", forged[0].cipher_public, forged[0].mask_public))
    with pytest.raises(secagg.BadSignature, match="not signed by its certificate from the federation's CA"):
        check_roster(4, forged, ca)  # a certificate of another CA, with the same name
    unsigned = [pb.EdgeKeys(edge_id="edge-0", index=1, cipher_public=entries[0].cipher_public,
                            mask_public=entries[0].mask_public), *entries[1:]]
    with pytest.raises(secagg.BadSignature, match="unsigned advertisement of 'edge-0'"):
        check_roster(4, unsigned, ca)


def test_survivor_confirmations_count_only_signatures_of_the_lists_this_edge_was_shown(test_pki) -> None:
    names = ["edge-0", "edge-1", "edge-2"]
    ca = x509.load_pem_x509_certificate(test_pki.ca.read_bytes())
    certs = {n: x509.load_pem_x509_certificate(test_pki.cert(n).read_bytes()).public_bytes(Encoding.DER)
             for n in names}  # fmt: skip

    def confirmation(name: str, survivors: list[str], dropped: list[str], round_id: int = 4):
        signed = secagg.survivors_bytes(round_id, survivors, dropped)
        signature = secagg.sign_advertisement(test_pki.key(name).read_bytes(), signed)
        return pb.SurvivorConfirmation(edge_id=name, signature=signature)

    shown = (names, [])
    everyone = [confirmation(n, *shown) for n in names]
    assert check_confirmations(4, shown, everyone, certs, ca) == 3
    assert check_confirmations(4, shown, everyone[:1] * 2, certs, ca) == 1  # one signer counts once
    # The server showed edge-2 other lists (edge-1 dropped), to collect both kinds of shares of edge-1.
    split = confirmation("edge-2", ["edge-0", "edge-2"], ["edge-1"])
    with pytest.raises(secagg.BadSignature, match="survivor list of 'edge-2' is not signed"):
        check_confirmations(4, shown, [*everyone[:2], split], certs, ca)
    with pytest.raises(secagg.BadSignature, match="survivor list of 'edge-0' is not signed"):
        check_confirmations(4, shown, [confirmation("edge-0", *shown, round_id=3)], certs, ca)  # replayed
    with pytest.raises(secagg.BadSignature, match="from 'edge-2', which is not a survivor"):
        shown = (names[:2], ["edge-2"])
        check_confirmations(4, shown, [confirmation("edge-2", *shown)], certs, ca)
