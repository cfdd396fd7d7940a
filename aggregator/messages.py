"""Conversions between the domain's records and fedocr.v1 messages (both directions)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator.federation import JoinResult, Receipt
from aggregator.rounds import Bytes, RoundRecord, TrainingPlan, total_bytes
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


def plan_message(plan: TrainingPlan) -> pb.TrainingPlan:
    """TrainingPlan message of a plan record."""
    return pb.TrainingPlan(
        local_epochs=plan.local_epochs,
        learning_rate=plan.learning_rate,
        batch_size=plan.batch_size,
        encoding=encodings.NAMES[plan.encoding],
        error_feedback=plan.error_feedback,
        optimizer=plan.optimizer,
    )


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
        plan=plan_message(r.plan),
        message=r.message,
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
    return status


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
            reply.plan.CopyFrom(plan_message(r.plan))
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
