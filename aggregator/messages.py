"""Conversions between the domain's records and fedocr.v1 messages (both directions)."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator.rounds import Bytes, JoinResult, Receipt, RoundRecord, TrainingPlan, total_bytes
from aggregator.secure import KINDS, PHASES, SecureRecord
from aggregator.secure.phases import SecureView
from aggregator.store import Manifest
from fedocr import encodings
from fedocr.errors import MalformedRequest
from fedocr.v1 import federation_pb2 as pb

ACTIONS = {
    "TRAIN": pb.JoinResponse.ACTION_TRAIN,
    "WAIT": pb.JoinResponse.ACTION_WAIT,
    "FINISHED": pb.JoinResponse.ACTION_FINISHED,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    """A protobuf Timestamp, or None for an unset time."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def round_state(name: str) -> int:
    """The RoundState enum value of a record's state name."""
    return pb.RoundState.Value(f"ROUND_STATE_{name}")


def byte_count(b: Bytes) -> pb.ByteCount:
    """ByteCount message of a Bytes record."""
    return pb.ByteCount(raw_up=b.raw_up, wire_up=b.wire_up, raw_down=b.raw_down, wire_down=b.wire_down)


def plan_message(plan: TrainingPlan, secure: SecureRecord | None = None) -> pb.TrainingPlan:
    """TrainingPlan message of a plan record (and of the round's secure settings, if any)."""
    message = pb.TrainingPlan(
        local_epochs=plan.local_epochs,
        learning_rate=plan.learning_rate,
        batch_size=plan.batch_size,
        encoding=encodings.NAMES[plan.encoding],
        error_feedback=plan.error_feedback,
        optimizer=plan.optimizer,
        proximal_mu=plan.proximal_mu,
    )
    if plan.warmup_words:
        words = pb.WarmUp(words=plan.warmup_words, styles=plan.warmup_styles, labels=plan.warmup_labels,
                          seed=plan.warmup_seed)
        if plan.warmup:
            message.warmup.CopyFrom(words)
        else:
            message.rehearsal.CopyFrom(pb.Rehearsal(words=words, share=plan.rehearsal_share))
    if secure is not None:
        message.encoding = pb.ENCODING_MASKED_INT
        message.error_feedback = plan.error_feedback and secure.bits > 0  # codes drop what feedback keeps
        message.secure.CopyFrom(
            pb.SecurePlan(
                enabled=True,
                clip=secure.clip,
                frac_bits=secure.frac_bits,
                round_seed=bytes.fromhex(secure.round_seed),
                weight_by_samples=secure.weight_by_samples,
                bits=secure.bits,
                sample_cap=secure.sample_cap,
                code_range=secure.code_range,
                hide_weights=secure.hide_weights,
            )
        )
    return message


def phase_name(value: int) -> str:
    """The domain name ("SHARE") of a SecurePhase value; MalformedRequest if unknown."""
    if not 0 < value <= len(PHASES):
        raise MalformedRequest(f"unknown secure phase {value}")
    return PHASES[value - 1]


def kind_name(value: int) -> str:
    """The domain name of a ShareKind value; MalformedRequest if unknown."""
    if not 0 < value <= len(KINDS):
        raise MalformedRequest(f"unknown share kind {value}: SELF_SEED or MASK_KEY")
    return KINDS[value - 1]


def secure_status(view: SecureView) -> pb.SecureRoundStatus:
    """SecureRoundStatus of a secure round as one edge sees it."""
    return pb.SecureRoundStatus(
        round_id=view.round_id,
        phase=PHASES.index(view.phase) + 1,
        threshold=view.threshold,
        neighbours=view.neighbours,
        roster=[
            pb.EdgeKeys(edge_id=e, index=x, cipher_public=c, mask_public=s, signature=sig, certificate=cert)
            for e, x, c, s, sig, cert in view.roster
        ],
        dealers=view.dealers,
        sealed=[pb.SealedShare(dealer=d, holder="", ciphertext=ct) for d, ct in view.sealed],
        survivors=view.survivors,
        dropped=view.dropped,
        message=view.message,
        confirmations=[pb.SurvivorConfirmation(edge_id=e, signature=s) for e, s in view.confirmations],
    )


def sealed_from(request: pb.ShareKeysRequest, dealer: str) -> tuple[dict, dict]:
    """(sealed by holder, commitment pair by holder) of a ShareKeys request; duplicates refused."""
    sealed, commits = {}, {}
    for s in request.sealed:
        if s.dealer not in ("", dealer) or s.holder in sealed:
            raise MalformedRequest(f"sealed share for {s.holder!r} repeated or not dealt by {dealer!r}")
        sealed[s.holder] = bytes(s.ciphertext)
    for c in request.commitments:
        if c.holder in commits:
            raise MalformedRequest(f"two commitments for holder {c.holder!r}")
        commits[c.holder] = (bytes(c.self_seed), bytes(c.mask_key))
    return sealed, commits


def plan_from(message: pb.TrainingPlan) -> TrainingPlan:
    """The plan record of a plain round's TrainingPlan message (a leaf copies the root's)."""
    warmup, share = pb.WarmUp(), 0.0
    if message.HasField("warmup"):
        warmup = message.warmup
    elif message.HasField("rehearsal"):
        warmup, share = message.rehearsal.words, message.rehearsal.share
    return TrainingPlan(
        local_epochs=message.local_epochs,
        learning_rate=message.learning_rate,
        batch_size=message.batch_size,
        optimizer=message.optimizer,
        encoding=encodings.name_of(message.encoding or pb.ENCODING_FLOAT32),
        error_feedback=message.error_feedback,
        proximal_mu=message.proximal_mu,
        warmup_words=warmup.words,
        warmup_styles=warmup.styles,
        warmup_labels=warmup.labels,
        warmup_seed=warmup.seed,
        rehearsal_share=share,
    )


def manifest_message(manifest: Manifest) -> pb.Manifest:
    """The Manifest message of a domain Manifest (inverse of manifest_from)."""
    specs = [pb.TensorSpec(id=i, length=n, exact=exact) for i, n, exact in manifest.tensors]
    return pb.Manifest(tensors=specs, fingerprint=manifest.fingerprint)


def manifest_from(message: pb.Manifest) -> Manifest:
    """The domain Manifest of a Join request's manifest."""
    if not message.tensors:
        raise MalformedRequest("Join needs a manifest: at least one TensorSpec and a fingerprint")
    return Manifest(tuple((t.id, t.length, t.exact) for t in message.tensors), bytes(message.fingerprint))


def round_status(r: RoundRecord) -> pb.RoundStatus:
    """RoundStatus of a round record."""
    end = r.closed_at if r.closed_at is not None else None
    status = pb.RoundStatus(
        round_id=r.round_id,
        round_index=r.round_index,
        total_rounds=r.total_rounds,
        state=round_state(r.state),
        quorum=r.quorum,
        min_edges=r.min_edges,
        opened_at=timestamp(r.opened_at),
        deadline=timestamp(r.deadline),
        closed_at=timestamp(end),
        bytes=byte_count(r.bytes()),
        state_version=r.state_version,
        plan=plan_message(r.plan, r.secure),
        message=r.message or secure_note(r),
        duration_seconds=(end - r.opened_at) if end is not None else 0.0,
    )
    for e in sorted(r.edges.values(), key=lambda e: e.edge_id):
        status.edges.add(
            edge_id=e.edge_id,
            uploaded=e.uploaded,
            samples=e.samples,
            bytes=byte_count(e.bytes),
            joined_at=timestamp(e.joined_at),
            uploaded_at=timestamp(e.uploaded_at),
        )
    for edge_id in sorted(r.evaluations):
        scores = r.evaluations[edge_id]
        status.evaluations.add(edge_id=edge_id, **{k: pb.Evaluation(**v) for k, v in scores.items() if v})
    mean = r.mean_evaluation()
    if mean is not None:
        status.evaluation.CopyFrom(pb.Evaluation(**mean))
    return status


def evaluation_from(message: pb.Evaluation) -> dict | None:
    """The record of one reported score (None when not set); MalformedRequest when out of range."""
    if not message.ByteSize():
        return None
    score = {"samples": message.samples, "loss": message.loss, "word_accuracy": message.word_accuracy,
             "char_accuracy": message.char_accuracy}
    if message.samples < 1 or not 0.0 <= message.loss < math.inf:
        raise MalformedRequest("an evaluation needs samples >= 1 and a finite loss >= 0")
    if not (0.0 <= message.word_accuracy <= 1.0 and 0.0 <= message.char_accuracy <= 1.0):
        raise MalformedRequest("word_accuracy and char_accuracy must be within [0, 1]")
    return score


def secure_note(r: RoundRecord) -> str:
    """What an open secure round is waiting for, for operators ("" for a plain round)."""
    sec = r.secure
    if sec is None or r.state != "OPEN":
        return ""
    waiting = {
        "ADVERTISE": f"{len(sec.keys)} edge(s) advertised keys",
        "SHARE": f"{len(sec.commitments)} of {len(sec.roster)} roster edge(s) dealt shares",
        "UPLOAD": f"{sum(r.has_uploaded(e) for e in sec.dealers)} of {len(sec.dealers)} dealer(s) uploaded",
        "UNMASK": f"{len(sec.revealers)} of {len(sec.survivors)} survivor(s) revealed shares",
    }
    return f"secure aggregation, phase {sec.phase}: {waiting.get(sec.phase, '')}"


def list_rounds(rounds: list[RoundRecord], version: int) -> pb.ListRoundsResponse:
    """ListRoundsResponse with per-round and total byte accounting."""
    return pb.ListRoundsResponse(
        rounds=[round_status(r) for r in rounds],
        total_bytes=byte_count(total_bytes(rounds)),
        state_version=version,
    )


def join_response(result: JoinResult) -> pb.JoinResponse:
    """JoinResponse of a join result."""
    reply = pb.JoinResponse(
        action=ACTIONS[result.action], edge_id=result.edge_id, state_version=result.state_version
    )
    r = result.round
    if r is not None:
        reply.round_index, reply.total_rounds = r.round_index, r.total_rounds
        if result.action == "TRAIN":
            reply.round_id = r.round_id
            reply.plan.CopyFrom(plan_message(r.plan, r.secure))
            reply.deadline.CopyFrom(timestamp(r.deadline))
    return reply


def receipt(r: Receipt) -> pb.UploadReceipt:
    """UploadReceipt of a receipt record."""
    return pb.UploadReceipt(
        round_id=r.round_id,
        edge_id=r.edge_id,
        raw_bytes=r.raw_bytes,
        wire_bytes=r.wire_bytes,
        committed_edges=r.committed,
        round_state=round_state(r.round_state),
        sha256=r.sha256,
    )
