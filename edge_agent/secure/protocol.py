"""One edge's secure round over the wire: advertise, deal, fetch, masked upload, reveal.

Runs an EdgeSession (edge_agent/secure/session.py) through a FederationClient's secure RPCs, waiting for
each phase with long-polls. The session lives in memory only: an edge that stops mid-round is
one of the round's dropouts, recovered from by the others' shares.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge_agent.secure.session import EdgeSession, SecureSettings
from fedocr import encodings, retry, secagg
from fedocr.client import FederationClient, Upload
from fedocr.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)


POLL_S = 10  # one long-poll; the phase wait repeats it


class RoundLeft(RuntimeError):
    """The secure round ended or went on without this edge (it advertised or dealt too late)."""


@dataclass(frozen=True)
class SecureResult:
    """A masked upload that was counted, and whether this edge's reveal was needed."""

    upload: Upload
    revealed: bool
    status: pb.SecureRoundStatus


def settings_of(plan: pb.TrainingPlan) -> SecureSettings:
    """The secure settings of a round's plan."""
    s = plan.secure
    return SecureSettings(
        s.clip, s.frac_bits, bytes(s.round_seed), s.weight_by_samples, s.bits, s.sample_cap, s.code_range,
        s.hide_weights,
    )


def run(
    client: FederationClient,
    reply: pb.JoinResponse,
    increment: np.ndarray,
    samples: int,
    fingerprint: bytes,
    base_version: int,
    statistics: int = 0,
    zstd_level: int = 3,
    patience_s: float = 3600.0,
    on_step: Callable[[str], None] | None = None,
) -> SecureResult:
    """Take part in the secure round of ``reply``; returns once the edge did its last part.

    ``increment``: float32 (n,). ``on_step`` hears "advertised", "shared", "uploaded", "revealed".
    Raises RoundLeft when the round ends or moves on without this edge.
    """
    step = on_step or (lambda _: None)
    round_id, me = reply.round_id, reply.edge_id
    session = EdgeSession(me, round_id, settings_of(reply.plan))
    keys = session.advertisement()
    endpoint = client.endpoint
    message = secagg.advertisement_bytes(round_id, me, *keys)
    certificate = x509.load_pem_x509_certificate(endpoint.cert.read_bytes()).public_bytes(Encoding.DER)
    signature = secagg.sign_advertisement(endpoint.key.read_bytes(), message)
    client.advertise(round_id, *keys, signature, certificate)
    step("advertised")

    status = _wait(client, round_id, pb.SECURE_PHASE_ADVERTISE, patience_s)
    roster = [(k.edge_id, k.index, bytes(k.cipher_public), bytes(k.mask_public)) for k in status.roster]
    if me not in {e for e, _, _, _ in roster}:
        raise RoundLeft(f"round {round_id}: the roster was fixed without this edge")
    ca = x509.load_pem_x509_certificate(endpoint.ca.read_bytes())
    check_roster(round_id, status.roster, ca)
    certificates = {k.edge_id: bytes(k.certificate) for k in status.roster}
    sealed, commitments = session.deal(roster, status.neighbours, status.threshold)
    client.share(round_id, sealed, commitments)
    step("shared")

    status = _wait(client, round_id, pb.SECURE_PHASE_SHARE, patience_s)  # no roster: kept from above
    if me not in status.dealers:
        raise RoundLeft(f"round {round_id}: the dealers were fixed without this edge")
    cipher_keys = {e: c for e, _, c, _ in roster}
    sealed_for_me = [(s.dealer, bytes(s.ciphertext)) for s in status.sealed]
    session.receive(list(status.dealers), sealed_for_me, cipher_keys)
    masked = session.masked(increment, samples, statistics)
    encoding = encodings.MASKED_BY_WIDTH[session.width()]
    hidden = session.hidden_count()  # hidden weights: the header declares none
    upload = client.upload(
        round_id, me, masked, 0 if hidden else samples, fingerprint, base_version, zstd_level, encoding, 0,
        statistics, hidden,
    )
    if session.decoded is not None:  # what the codes stand for: error feedback keeps the rest
        upload = dataclasses.replace(upload, decoded=session.decoded)
    step("uploaded")

    status = _wait(client, round_id, pb.SECURE_PHASE_UPLOAD, patience_s, allow_done=True)
    if status.phase == pb.SECURE_PHASE_DONE:
        return SecureResult(upload, False, status)
    survivors, dropped = list(status.survivors), list(status.dropped)
    session.check_survivors(survivors, dropped)  # before signing them
    shown = secagg.survivors_bytes(round_id, survivors, dropped)
    client.confirm(round_id, secagg.sign_advertisement(endpoint.key.read_bytes(), shown))
    step("confirmed")
    status = _wait_confirmed(
        client, round_id, (survivors, dropped), certificates, ca, session.threshold, patience_s
    )
    if status.phase == pb.SECURE_PHASE_DONE:
        return SecureResult(upload, False, status)
    shares = session.reveal(survivors, dropped)
    try:
        status = client.reveal(round_id, shares)
    except grpc.RpcError as exc:
        # The others' reveals were enough and closed the round first: the upload is in its sum.
        if retry.status_code(exc) != grpc.StatusCode.FAILED_PRECONDITION or not client.counted(round_id, me):
            raise
        log.info("round %s: closed before this edge's reveal, with its upload counted", round_id)
        return SecureResult(upload, False, client.secure_round(round_id, pb.SECURE_PHASE_UPLOAD, 0))
    step("revealed")
    log.info("round %s: revealed %d share(s) for unmasking", round_id, len(shares))
    return SecureResult(upload, True, status)


def check_roster(round_id: int, roster: Iterable[pb.EdgeKeys], ca: x509.Certificate) -> None:
    """Check that every roster entry's keys were signed by that edge's certificate from the
    federation's CA: a server that substitutes keys to sit between two edges is caught here.

    Raises secagg.BadSignature naming the edge (before this edge deals or masks anything).
    """
    for k in roster:
        if not k.signature or not k.certificate:
            raise secagg.BadSignature(f"round {round_id}: the roster carries an unsigned advertisement of "
                                      f"{k.edge_id!r}")
        keys = bytes(k.cipher_public), bytes(k.mask_public)
        message = secagg.advertisement_bytes(round_id, k.edge_id, *keys)
        secagg.verify_advertisement(ca, bytes(k.certificate), k.edge_id, message, bytes(k.signature))


def check_confirmations(
    round_id: int,
    shown: tuple[list[str], list[str]],
    confirmations: Iterable[pb.SurvivorConfirmation],
    certificates: dict[str, bytes],
    ca: x509.Certificate,
) -> int:
    """The number of survivors whose signature confirms the survivors and dropped this edge was
    ``shown``. A signature of other lists, or of an edge that is not a survivor, means the server
    showed the survivors different lists: raises secagg.BadSignature naming the edge."""
    survivors, dropped = shown
    message = secagg.survivors_bytes(round_id, survivors, dropped)
    seen = set()
    for c in confirmations:
        if c.edge_id not in survivors or c.edge_id not in certificates:
            raise secagg.BadSignature(f"round {round_id}: a survivors' confirmation from {c.edge_id!r}, "
                                      "which is not a survivor this edge was shown")  # fmt: skip
        secagg.verify_advertisement(
            ca, certificates[c.edge_id], c.edge_id, message, bytes(c.signature), what="survivor list"
        )
        seen.add(c.edge_id)
    return len(seen)


def _wait_confirmed(
    client: FederationClient,
    round_id: int,
    shown: tuple[list[str], list[str]],
    certificates: dict[str, bytes],
    ca: x509.Certificate,
    threshold: int,
    patience_s: float,
) -> pb.SecureRoundStatus:
    """Long-poll until ``threshold`` survivors signed the lists this edge was shown (each checked);
    RoundLeft if they do not within ``patience_s``. The round may close meanwhile (phase DONE)."""
    until = time.monotonic() + patience_s
    while True:
        status = client.secure_round(round_id, pb.SECURE_PHASE_UPLOAD, POLL_S, confirmations=threshold)
        if status.phase == pb.SECURE_PHASE_DONE:
            return status
        if (list(status.survivors), list(status.dropped)) != (shown[0], shown[1]):
            raise secagg.BadSignature(f"round {round_id}: the server showed this edge two survivor lists")
        if check_confirmations(round_id, shown, status.confirmations, certificates, ca) >= threshold:
            return status
        if time.monotonic() > until:
            raise RoundLeft(f"round {round_id}: fewer than {threshold} survivors confirmed the survivor list")


def _wait(
    client: FederationClient, round_id: int, after: int, patience_s: float, allow_done: bool = False
) -> pb.SecureRoundStatus:
    """Long-poll until the phase is past ``after``; RoundLeft if the round ended (unless allowed)."""
    until = time.monotonic() + patience_s
    while True:
        status = client.secure_round(round_id, after, POLL_S)
        if status.phase == pb.SECURE_PHASE_DONE and not allow_done:
            raise RoundLeft(f"round {round_id} ended: {status.message}")
        if status.phase > after:
            return status
        if time.monotonic() > until:
            raise RoundLeft(f"round {round_id}: still in phase {pb.SecurePhase.Name(status.phase)}")
