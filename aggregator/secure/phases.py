"""SecureRounds: secure aggregation's RPCs, its phase clock and the masked sum, as one part.

The RoundCoordinator (aggregator/coordinator.py) composes it and hands it a ``Wiring``: the lock,
the clock, the open round and the history, the durable-commit and phase-write functions, and the
close and retry of a round. What an RPC changes in the round's SecureRecord is made durable by a
group commit before the reply, exactly like an upload; phase changes are written by the clock only
when no commit is pending, so the disk never holds a record ahead of its masked sum.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.longpoll import LongPolls
from aggregator.rounds import OPEN, Bytes, RoundRecord
from aggregator.secure.record import ADVERTISE, DONE, PHASES, SHARE, UNMASK, UPLOAD, SecureRecord
from fedocr import encodings, secagg
from fedocr.errors import MalformedRequest, OverWeight, RoundClosed, UnknownRound, WrongMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    """What SecureRounds uses of the coordinator, handed over explicitly; all called with ``cond`` held."""

    cond: threading.Condition  # the coordinator's lock: every method of SecureRounds runs under it
    clock: Callable[[], float]
    current: Callable[[], RoundRecord | None]  # the open round (None once the federation finished)
    history: Callable[[], list[RoundRecord]]  # the ended rounds, oldest first
    commit: Callable[[], None]  # group-commit the round record (and masked sum); wait for the fsync
    save: Callable[[RoundRecord], None]  # write a phase change at once (back to the disk on failure)
    close: Callable[[float, np.ndarray], None]  # apply the unmasked mean (float32 (n,)); next round
    retry: Callable[[RoundRecord, float], None]  # persist a failed round and open its retry
    polls: LongPolls
    exact: Callable[[], np.ndarray]  # flat bool (n,): the manifest's exact values (running statistics)


@dataclass(frozen=True)
class SecureView:
    """What an edge sees of a secure round (the reply of every secure RPC)."""

    round_id: int
    phase: str
    threshold: int = 0
    neighbours: int = 0
    # id, x, c_u, s_u, and the advertisement's signature and certificate (empty when unsigned)
    roster: list[tuple[str, int, bytes, bytes, bytes, bytes]] = field(default_factory=list)
    dealers: list[str] = field(default_factory=list)
    sealed: list[tuple[str, bytes]] = field(default_factory=list)  # (dealer, ciphertext) for the caller
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    confirmations: list[tuple[str, bytes]] = field(default_factory=list)  # (survivor, signature)
    message: str = ""


def view_of(r: RoundRecord, edge_id: str, after: str | None = None) -> SecureView:
    """The caller's view of a round's secure record (phase DONE once the round ended).

    Each wait gets what the next step needs, once (the roster alone is O(n) bytes): waiting
    ``after`` ADVERTISE, the roster; after SHARE, the dealers and the shares sealed for the
    caller; after UPLOAD, survivors and dropped. Without ``after`` (a reply to a request that
    changed the round), the phase only.
    """
    sec = r.secure
    if r.state != OPEN:
        return SecureView(r.round_id, DONE, message=f"round {r.round_id} is {r.state.lower()}: {r.message}")
    view = SecureView(r.round_id, sec.phase, sec.threshold, sec.neighbours)
    if after == ADVERTISE and sec.phase != ADVERTISE:
        view.roster.extend(
            (e, sec.index(e), bytes.fromhex(sec.keys[e][0]), bytes.fromhex(sec.keys[e][1]),
             *(bytes.fromhex(x) for x in sec.signed.get(e, ["", ""])))
            for e in sec.roster
        )
    if after == SHARE and sec.phase not in (ADVERTISE, SHARE):
        view.dealers.extend(sec.dealers)
        view.sealed.extend(sec.sealed_for(edge_id))
    if after == UPLOAD:
        view.survivors.extend(sec.survivors)
        view.dropped.extend(sec.dropped)
        view.confirmations.extend((e, bytes.fromhex(s)) for e, s in sorted(sec.confirmations.items()))
    return view


def still_waiting(view: SecureView, after: str, confirmations: int = 0) -> bool:
    """Whether a long-poll waiting ``after`` a phase waits on: the round is still at or before that
    phase, or (waiting after UPLOAD) in UNMASK with fewer than ``confirmations`` confirmations."""
    if PHASES.index(view.phase) <= PHASES.index(after):
        return True
    return after == UPLOAD and view.phase == UNMASK and len(view.confirmations) < confirmations


class SecureRounds:
    """Secure aggregation inside the coordinator: the RPCs, the phase clock and the masked sum.

    Owns the round's masked sum (uint32, mod 2^32); everything else it reads or changes comes
    through its ``Wiring``.
    """

    def __init__(self, config: AggregatorConfig, wiring: Wiring) -> None:
        self._config = config
        self._w = wiring
        self.masked: np.ndarray | None = None  # the open round's sum of masked uploads
        self._masked_changed = False  # since the last durable write

    # -- the masked sum --------------------------------------------------------------------

    def load(self, masked: np.ndarray | None, size: int | None) -> None:
        """Take the masked sum read back from the store (zeros of the model's ``size`` when it holds
        none), with room for hidden weights after the model's values."""
        if size is not None:
            full = np.zeros(size + secagg.HIDDEN_VALUES, dtype=np.uint32)
            if masked is not None:
                full[: masked.size] = masked  # a sum stored before hidden weights had no room for them
            masked = full
        self.masked = masked
        self._masked_changed = False

    def clear(self) -> None:
        """Empty the masked sum (the round ended; the next one starts from zeros)."""
        if self.masked is not None:
            self.masked.fill(0)

    def to_write(self) -> np.ndarray | None:
        """The masked sum when an upload changed it since the last write (not on key or share writes)."""
        masked, self._masked_changed = (self.masked if self._masked_changed else None), False
        return masked

    def check_encoding(self, encoding: int) -> None:
        """Raise unless the federation takes uploads in ``encoding``: masked integers exactly when secure
        (which width a secure round takes, SecureRecord.check_encoding says)."""
        config = self._config
        masked = encoding in encodings.MASKED_DTYPES
        if config.secure_aggregation and not masked:
            raise WrongMode(
                "this federation runs secure aggregation: uploads must be ENCODING_MASKED_INT (or its "
                f"16- or 8-bit width), not {encodings.name_of(encoding)}"
            )
        if not config.secure_aggregation and masked:
            raise MalformedRequest(
                f"{encodings.name_of(encoding)} is for secure aggregation, which this federation does not run"
            )
        accepted = [encodings.NAMES[name] for name in config.accept_encodings]
        if not config.secure_aggregation and encoding not in accepted:
            raise MalformedRequest(
                f"encoding {encodings.name_of(encoding)} is not accepted by this federation "
                f"(accepted: {', '.join(config.accept_encodings)})"
            )

    def add(self, r: RoundRecord, edge_id: str, arrays: list[np.ndarray], weight: float) -> None:
        """Add one masked upload (uint32 per tensor) into the round's masked sum, mod 2^32.

        Called when the stream has been read: the phase is checked again (SecureRecord.check_commit).
        """
        r.secure.check_commit(edge_id)
        limit = self._config.secagg_weight_limit
        if not r.secure.hide_weights and r.weight + weight > limit:
            raise OverWeight(
                f"upload from {edge_id!r} would take the round's weight to {r.weight + weight:g}, above "
                f"{limit:g} (secure_aggregation.max_weight_sum, and the quorum with uniform weighting): "
                "the masked sum could wrap"
            )
        offset = 0
        for values in arrays:
            self.masked[offset : offset + values.size] += values  # uint32: wraps mod 2^32
            offset += values.size
        r.secure.add_code_weight(weight)
        self._masked_changed = True

    def mean(self, r: RoundRecord) -> np.ndarray:
        """The survivors' weighted mean increment, float32 (n,), from the masked sum."""
        unmasked = r.secure.unmask(self.masked)
        if r.secure.hide_weights:
            mean = r.secure.decode(unmasked, 0.0, self._w.exact())
            r.weight = secagg.read_hidden(unmasked[-secagg.HIDDEN_VALUES :])[0]  # known only now
            return mean
        return r.secure.decode(unmasked[: -secagg.HIDDEN_VALUES], r.weight, self._w.exact())

    # -- RPCs ------------------------------------------------------------------------------

    def advertise(
        self, edge_id: str, round_id: int, cipher_public: bytes, mask_public: bytes, moved: Bytes,
        signed: tuple[bytes, bytes] = (b"", b""),
    ) -> SecureView:
        """Record the edge's two public keys for the round (once; a different second set is refused)."""
        with self._w.cond:
            r = self._secure_round(round_id)
            earlier = [h.secure for h in self._w.history() if h.secure is not None]
            used = {k for sec in earlier for ks in sec.keys.values() for k in ks}
            r.secure.advertise(edge_id, cipher_public, mask_public, used, *signed)
            return self._durable(r, edge_id, moved)

    def share(
        self,
        edge_id: str,
        round_id: int,
        sealed: dict[str, bytes],
        commitments: dict[str, tuple[bytes, bytes]],
        moved: Bytes,
    ) -> SecureView:
        """Record the shares the edge dealt, sealed for its neighbours, and its commitments."""
        with self._w.cond:
            r = self._secure_round(round_id)
            r.secure.share(edge_id, sealed, commitments)
            return self._durable(r, edge_id, moved)

    def reveal(
        self, edge_id: str, round_id: int, shares: list[tuple[str, str, bytes]], moved: Bytes
    ) -> SecureView:
        """Record the shares a survivor revealed, each checked against its dealer's commitment."""
        with self._w.cond:
            r = self._secure_round(round_id)
            r.secure.reveal(edge_id, shares)
            return self._durable(r, edge_id, moved)

    def confirm(self, edge_id: str, round_id: int, signature: bytes, moved: Bytes) -> SecureView:
        """Record a survivor's signature of the survivors and dropped it was shown."""
        with self._w.cond:
            r = self._secure_round(round_id)
            r.secure.confirm(edge_id, signature)
            return self._durable(r, edge_id, moved)

    def secure_round(
        self, edge_id: str, round_id: int, after: str, wait_s: float, confirmations: int = 0
    ) -> SecureView:
        """Long-poll until the round's phase is past ``after`` (or it ended, or the wait is over);
        in UNMASK, waiting after UPLOAD, also until ``confirmations`` survivors confirmed."""
        clock, polls = self._w.clock, self._w.polls
        until = clock() + max(0.0, min(wait_s, self._config.join_wait_max_s))
        with self._w.cond:
            view = view_of(self._secure_round(round_id, ended_ok=True), edge_id, after)
            while still_waiting(view, after, confirmations) and not polls.draining and clock() < until:
                self._w.cond.wait(min(until - clock(), 1.0))
                view = view_of(self._secure_round(round_id, ended_ok=True), edge_id, after)
            return view

    def _secure_round(self, round_id: int, ended_ok: bool = False) -> RoundRecord:
        """The current secure round if it is ``round_id``; raise a named error otherwise."""
        self._w.polls.check_serving()
        if not self._config.secure_aggregation:
            raise WrongMode("this federation does not run secure aggregation; upload plain increments")
        r = self._w.current()
        if r is not None and r.round_id == round_id and r.secure is not None:
            return r
        for h in self._w.history():
            if h.round_id == round_id:
                if ended_ok and h.secure is not None:
                    return h
                raise RoundClosed(
                    f"round {round_id} has ended; secure-aggregation messages for it are refused "
                    f"(the current round is {r.round_id if r else 'none: the federation finished'})"
                )
        current = r.round_id if r else "none"
        raise UnknownRound(f"round {round_id} does not exist; the current round is {current}")

    def _durable(self, r: RoundRecord, edge_id: str, moved: Bytes) -> SecureView:
        """Count the request's bytes, make the record durable (group commit) and answer."""
        r.edge(edge_id).bytes.add(moved)
        self._w.commit()
        self._w.cond.notify_all()
        return view_of(r, edge_id)

    # -- the phase clock -------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move the open secure round to its next phase when its condition or deadline says so.

        Called with the lock held and no commit pending; a phase change is written at once.
        """
        r: RoundRecord = self._w.current()
        sec: SecureRecord = r.secure
        phase_s = self._config.secagg_phase_s
        why, before = "", sec.phase
        if sec.phase == ADVERTISE:
            n = len(sec.keys)
            if n >= r.quorum or (r.past_deadline(now) and n >= r.min_edges):
                why = sec.fix_roster(now, phase_s)
            elif r.past_deadline(now):
                why = f"deadline passed with {n} edge(s) advertising keys, below the minimum of {r.min_edges}"
        elif sec.phase == SHARE and (sec.all_dealt() or now >= sec.phase_deadline):
            why = sec.start_upload(now, phase_s)
            if not why and len(sec.dealers) < r.min_edges:
                why = f"{len(sec.dealers)} edge(s) dealt shares, below the minimum of {r.min_edges}"
        elif sec.phase == UPLOAD:
            uploaded = {e for e in sec.dealers if r.has_uploaded(e)}
            if len(uploaded) == len(sec.dealers) or now >= sec.phase_deadline:
                sec.start_unmask(uploaded, now, phase_s)
                if len(uploaded) < r.min_edges:
                    why = f"{len(uploaded)} masked upload(s), below the minimum of {r.min_edges}"
        elif sec.phase == UNMASK:
            missing = sec.missing()
            if not missing:
                try:
                    mean = self.mean(r)
                except secagg.SecAggError as exc:
                    why = f"unmasking failed: {exc}"
                else:
                    self._w.close(now, mean)
                    return
            elif set(sec.revealers) >= set(sec.survivors) or now >= sec.phase_deadline:
                why = (
                    f"too many edges dropped: {len(sec.revealers)} of {len(sec.survivors)} survivor(s) "
                    f"revealed shares and the threshold is {sec.threshold}; missing: {'; '.join(missing[:5])}"
                )
        if why:
            r.fail_with(now, why)
            self._w.retry(r, now)
        elif sec.phase != before:
            self._w.save(r)
            logger.info("round %s: secure phase %s -> %s", r.round_id, before, sec.phase)
            self._w.cond.notify_all()


__all__ = ["SecureRounds", "SecureView", "Wiring", "view_of"]
