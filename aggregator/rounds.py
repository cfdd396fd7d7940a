"""Round bookkeeping: one round's record (edges, bytes, timings), its legal transitions, and the
records the RoundCoordinator answers with (JoinResult, Receipt).

Pure Python, clock passed in: no I/O, no locks, no grpc. Records serialise to JSON for the store.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aggregator.secure.record import SecureRecord
from fedocr.errors import DuplicateUpload, NotReady, RoundClosed, UnknownRound

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

OPEN, AGGREGATING, CLOSED, FAILED, FINISHED = "OPEN", "AGGREGATING", "CLOSED", "FAILED", "FINISHED"
BYTE_FIELDS = ("raw_up", "wire_up", "raw_down", "wire_down")
EVALUATION_FIELDS = ("samples", "loss", "word_accuracy", "char_accuracy")


@dataclass
class Bytes:
    """Bytes moved, as encoded tensors (raw) and after compression (wire)."""

    raw_up: int = 0
    wire_up: int = 0
    raw_down: int = 0
    wire_down: int = 0

    def add(self, other: Bytes) -> None:
        """Add another count into this one."""
        for name in BYTE_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class EdgeRecord:
    """One edge's part in one round."""

    edge_id: str
    joined_at: float | None = None
    uploaded: bool = False
    uploaded_at: float | None = None
    samples: int = 0
    weight: float = 0.0
    bytes: Bytes = field(default_factory=Bytes)


@dataclass
class TrainingPlan:
    """What edges do locally in a round (Algorithm 1) and how they encode their upload."""

    local_epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str = ""  # "" leaves it to the edge (records written before the field existed)
    encoding: str = "float32"  # fedocr.encodings.NAMES
    error_feedback: bool = False
    proximal_mu: float = 0.0  # FedProx's mu (0: plain local training)
    # A warm-up round: edges render this many words of these styles and label kind, and train on
    # them instead of their shard (0: an ordinary round).
    warmup_words: int = 0
    warmup_styles: str = ""
    warmup_labels: str = ""
    warmup_seed: int = 0
    # > 0: an ordinary round that rehearses the warm-up words above, this many per shard image.
    rehearsal_share: float = 0.0

    @property
    def warmup(self) -> bool:
        """A warm-up round: edges train on their rendered words alone."""
        return self.warmup_words > 0 and not self.rehearsal_share


@dataclass
class RoundRecord:
    """One round: id (1-based, new on retry), index (0-based into the plan), state and edges."""

    round_id: int
    round_index: int
    total_rounds: int
    quorum: int
    min_edges: int
    opened_at: float
    deadline: float
    state_version: int
    plan: TrainingPlan
    state: str = OPEN
    closed_at: float | None = None
    message: str = ""
    weight: float = 0.0  # sum of the weights committed into the running sum
    edges: dict[str, EdgeRecord] = field(default_factory=dict)
    secure: SecureRecord | None = None  # set when the round runs secure aggregation
    # Federated evaluation of this round's result: edge id -> {"generic": {...}, "personal": {...}}
    # with samples, loss, word_accuracy and char_accuracy each (ReportEvaluation).
    evaluations: dict[str, dict] = field(default_factory=dict)
    # Edges whose record changed since the store last wrote it: the current round's edges are stored
    # one key each, and a durable write puts only these (O(changes), not O(edges)). Not serialised.
    dirty: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    # How many edges have an acknowledged upload: counted once here and kept by `commit`, so the
    # check made on every upload is O(1) in the edges. Not serialised (the edges hold it).
    _committed: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._committed = sum(1 for e in self.edges.values() if e.uploaded)

    # -- queries ---------------------------------------------------------------------------

    def brief(self) -> RoundRecord:
        """A copy for a reply built outside the lock: ids, clock, plan and the secure round's
        settings, without its edges, evaluations or per-edge secure data (O(1) in the edges)."""
        secure = self.secure.settings_only() if self.secure is not None else None
        return dataclasses.replace(
            self, edges={}, evaluations={}, secure=secure, plan=copy.deepcopy(self.plan)
        )

    @property
    def committed(self) -> int:
        """How many edges have an acknowledged upload in this round."""
        return self._committed

    def has_uploaded(self, edge_id: str) -> bool:
        """Whether `edge_id` already has an acknowledged upload in this round."""
        edge = self.edges.get(edge_id)
        return edge is not None and edge.uploaded

    def bytes(self) -> Bytes:
        """The round's byte totals over all edges."""
        total = Bytes()
        for edge in self.edges.values():
            total.add(edge.bytes)
        return total

    def quorum_reached(self) -> bool:
        """True once `quorum` edges uploaded."""
        return self.committed >= self.quorum

    def past_deadline(self, now: float) -> bool:
        """True when the round is open and its deadline has passed."""
        return self.state == OPEN and now >= self.deadline

    # -- transitions -----------------------------------------------------------------------

    def edge(self, edge_id: str) -> EdgeRecord:
        """The edge's record in this round, created on first use."""
        if edge_id not in self.edges:
            self.edges[edge_id] = EdgeRecord(edge_id=edge_id)
        self.dirty.add(edge_id)  # every change to an edge's record goes through here
        return self.edges[edge_id]

    def join(self, edge_id: str, now: float) -> None:
        """Note that an edge was handed this round to train."""
        edge = self.edge(edge_id)
        if edge.joined_at is None:
            edge.joined_at = now

    def check_upload(self, edge_id: str, round_id: int) -> None:
        """Raise unless `edge_id` may upload now for `round_id` (this record is the current round)."""
        if round_id == 0 or round_id > self.round_id:
            raise UnknownRound(f"round {round_id} does not exist; the current round is {self.round_id}")
        if round_id != self.round_id or self.state != OPEN:
            state = "closed" if round_id != self.round_id else self.state.lower()
            raise RoundClosed(
                f"round {round_id} is {state} and takes no uploads; the current round is "
                f"{self.round_id} ({self.state.lower()}): join again"
            )
        if self.has_uploaded(edge_id):
            raise DuplicateUpload(f"edge {edge_id!r} already has an acknowledged upload in round {round_id}")

    def check_base(self, base_state_version: int) -> None:
        """Raise RoundClosed unless an increment computed from ``base_state_version`` fits this round."""
        if base_state_version not in (0, self.state_version):
            raise RoundClosed(
                f"increment computed from state version {base_state_version}; round "
                f"{self.round_id} trains from version {self.state_version}: download the state again"
            )

    def commit(self, edge_id: str, samples: int, weight: float, moved: Bytes, now: float) -> None:
        """Record an acknowledged upload (the sum was updated by the caller)."""
        edge = self.edge(edge_id)
        if not edge.uploaded:
            self._committed += 1
        edge.uploaded, edge.uploaded_at, edge.samples, edge.weight = True, now, samples, weight
        edge.bytes.add(moved)
        self.weight += weight

    def mean_evaluation(self) -> dict | None:
        """The sample-weighted mean of the edges' scores of the generic model, or None."""
        scores = [e["generic"] for e in self.evaluations.values() if e.get("generic")]
        total = sum(s["samples"] for s in scores)
        if not total:
            return None
        mean = {k: sum(s[k] * s["samples"] for s in scores) / total for k in EVALUATION_FIELDS[1:]}
        return {"samples": total, **mean}

    def close(self, now: float) -> None:
        """Mark the round aggregated into the global state."""
        self.state, self.closed_at = CLOSED, now
        self.message = f"aggregated {self.committed} upload(s)"

    def fail(self, now: float) -> None:
        """Mark the round failed: deadline passed below the minimum number of uploads."""
        self.state, self.closed_at = FAILED, now
        self.message = (
            f"deadline passed with {self.committed} upload(s), below the minimum of {self.min_edges}; "
            f"round {self.round_index} is retried under a new id"
        )

    def fail_with(self, now: float, why: str) -> None:
        """Mark the round failed for a stated reason (secure aggregation: a phase fell short)."""
        self.state, self.closed_at = FAILED, now
        self.message = (
            f"{why}; the global state is unchanged and round {self.round_index} is retried under a new id"
        )

    # -- serialisation ---------------------------------------------------------------------

    def to_json(self, with_edges: bool = True) -> bytes:
        """Serialise to UTF-8 JSON (a secure record without its blobs: SecureRecord.core); without
        the edges when ``with_edges`` is false (the store keeps the current round's one key each)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        doc["plan"] = dataclasses.asdict(self.plan)
        if with_edges:  # vars, not asdict: asdict deep-copies each edge
            doc["edges"] = {k: _edge_doc(e) for k, e in self.edges.items()}
        else:
            del doc["edges"]
        doc["secure"] = self.secure.core() if self.secure is not None else None
        return json.dumps(doc, sort_keys=True).encode()

    def edge_json(self, edge_id: str) -> bytes:
        """One edge's record as UTF-8 JSON (``edge_from_json`` reads it)."""
        return json.dumps(_edge_doc(self.edges[edge_id]), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, edges: list[EdgeRecord] | None = None) -> RoundRecord:
        """Inverse of to_json; ``edges``: those stored apart (overriding any in ``data``).

        A record stored with its edges inside (every record before the per-edge layout) comes
        back with all of them marked dirty, so that its next write moves them to their own keys.
        """
        doc: dict[str, Any] = json.loads(data)
        doc["plan"] = TrainingPlan(**doc["plan"])
        inside = {k: _edge_from_doc(e) for k, e in doc.get("edges", {}).items()}
        doc["edges"] = {**inside, **{e.edge_id: e for e in edges or []}}
        if doc.get("secure") is not None:
            doc["secure"] = SecureRecord.from_dict(doc["secure"])
        record = cls(**doc)
        record.dirty.update(inside)
        return record


def _edge_doc(edge: EdgeRecord) -> dict[str, Any]:
    return {**vars(edge), "bytes": vars(edge.bytes)}


def _edge_from_doc(doc: dict[str, Any]) -> EdgeRecord:
    return EdgeRecord(**{**doc, "bytes": Bytes(**doc["bytes"])})


def edge_from_json(data: bytes) -> EdgeRecord:
    """Inverse of RoundRecord.edge_json."""
    return _edge_from_doc(json.loads(data))


@dataclass(frozen=True)
class JoinResult:
    """What Join answers: TRAIN (with the round), WAIT or FINISHED."""

    action: str
    edge_id: str
    round: RoundRecord | None = None
    state_version: int = 0


@dataclass(frozen=True)
class Receipt:
    """What an acknowledged upload answers."""

    round_id: int
    edge_id: str
    raw_bytes: int
    wire_bytes: int
    committed: int
    round_state: str
    sha256: bytes


@dataclass(frozen=True)
class Forward:
    """A leaf's round sum, ready to go to the root: the float64 sum, its weight and upload count."""

    round_id: int
    total: Any  # np.ndarray, float64 (n,)
    weight: int
    uploads: int
    state_version: int  # the version every upload in the sum was computed from


@dataclass(frozen=True)
class UpstreamRound:
    """What a leaf takes from the root's Join answer: the round's index and plan, or the end."""

    index: int
    total_rounds: int
    plan: TrainingPlan
    finished: bool = False


def find(current: RoundRecord | None, history: list[RoundRecord], round_id: int) -> RoundRecord:
    """The record of ``round_id`` (0 = current; the last one, FINISHED, once every round ended).

    Not a copy (but for FINISHED, a shallow one): a caller that hands it out copies it.
    """
    if round_id == 0 or (current and round_id == current.round_id):
        if current is not None:
            return current
        if not history:
            raise NotReady("no round yet: the first edge to Join opens round 1")
        return dataclasses.replace(history[-1], state=FINISHED)
    for record in history:
        if record.round_id == round_id:
            return record
    raise UnknownRound(f"round {round_id} does not exist")


def check_after_the_last(history: list[RoundRecord], round_id: int) -> None:
    """Refuse an upload once the federation finished: NOT_FOUND or FAILED_PRECONDITION."""
    if round_id == 0 or round_id > history[-1].round_id:
        raise UnknownRound(f"round {round_id} does not exist; the federation finished")
    raise RoundClosed(f"round {round_id} is closed; the federation finished")


def new_round(config: AggregatorConfig, round_id: int, index: int, now: float, version: int) -> RoundRecord:
    """A fresh OPEN round with the config's quorum, deadline and this index's training plan."""
    return RoundRecord(
        round_id=round_id,
        round_index=index,
        total_rounds=config.total_rounds,
        quorum=config.quorum,
        min_edges=config.round_min_edges,
        opened_at=now,
        deadline=now + config.deadline_s,
        state_version=version,
        plan=TrainingPlan(
            config.local_epochs,
            config.learning_rate_for(index),
            config.batch_size,
            config.optimizer,
            config.encoding,
            config.error_feedback,
            config.proximal_mu,
            *config.warmup_for(index),
        ),
        secure=SecureRecord.new(
            round_id,
            config.secagg_clip,
            config.secagg_bits,
            config.weighting == "samples",
            config.secagg_threshold,
            config.secagg_neighbours,
            config.secagg_code_bits,
            config.secagg_sample_cap,
            config.secagg_code_range,
            config.secagg_hide_weights,
        )
        if config.secure_aggregation
        else None,
    )


def total_bytes(records: list[RoundRecord]) -> Bytes:
    """Byte totals over several rounds."""
    total = Bytes()
    for record in records:
        total.add(record.bytes())
    return total
