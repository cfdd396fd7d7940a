"""RoundCoordinator, the aggregator's round object: joins, downloads, uploads and the round clock.

It owns the global state (float32, flat), the open round's running sum (float64, flat), the round
record and the store, behind one lock, and composes SecureRounds (aggregator/secure/phases.py) for
secure aggregation. It raises fedocr.errors exceptions and never imports grpc.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from aggregator import fedavg, rounds, server_opt, spool
from aggregator.config import AggregatorConfig
from aggregator.groupcommit import GroupCommitter
from aggregator.longpoll import LongPolls, NotifyingCondition
from aggregator.rounds import (
    AGGREGATING,
    CLOSED,
    FAILED,
    OPEN,
    Bytes,
    Forward,
    JoinResult,
    Receipt,
    RoundRecord,
    UpstreamRound,
    new_round,
)
from aggregator.secure import SecureRecord
from aggregator.secure.phases import SecureRounds, Wiring
from aggregator.spool import LogEntry, SpoolFile
from aggregator.store import Manifest, Store
from aggregator.transfer import StateCache, StateStream, chain_stream
from aggregator.upload import read_header, stage
from aggregator.visible import Change, chain_to_keep, encode_change
from fedocr import encodings, secagg
from fedocr.errors import (
    Busy,
    DuplicateUpload,
    MalformedRequest,
    ModelMismatch,
    NotReady,
    RoundClosed,
    StorageUnavailable,
    UnknownRound,
    WrongMode,
)
from fedocr.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

MAX_MODEL_VALUES = 1 << 30  # refuse a manifest over 4 GiB of float32 rather than allocate it
TICK_S = 0.2


class RoundCoordinator:
    """Rounds, FedAvg and durability behind one lock; the servicer calls one method per RPC.

    Secure aggregation's phases, RPCs and masked sum are ``self.secure``, a SecureRounds wired to
    this object's lock, clock, rounds and durable writes.
    """

    def __init__(
        self, config: AggregatorConfig, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._store = store
        self._clock = clock
        self._cond = NotifyingCondition()  # the asyncio server's long-polls listen to it
        self._uploads = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self._in_flight: set[str] = set()
        self._polls = LongPolls(config)
        self._ticker: threading.Thread | None = None
        self._notes_pending = False  # the round's record has join/download notes not on disk
        # The upload log (aggregator/spool.py): uploads applied but not yet durable, and those
        # durable in the log but not in the stored sum.
        self._pending: list[tuple[SpoolFile, LogEntry]] = []
        self._logged: list[LogEntry] = []
        self._next_seq = 0
        self._buffers: list[np.ndarray] = []  # staging buffers (at most one per upload slot)
        self._cache = StateCache(config.zstd_level, config.chunk_elements)
        self._commits = GroupCommitter(self._cond, self._prepare_write, self._load, self._maybe_close)
        wiring = Wiring(  # what SecureRounds may use of this object: nothing else of it reaches there
            cond=self._cond, clock=clock, current=lambda: self._round, history=lambda: self._history,
            commit=lambda: self._commits.wait_durable(self._commits.apply()), save=self._save_phase,
            close=self._aggregate, retry=self._retry, polls=self._polls,
            exact=lambda: server_opt.exact_mask(self.manifest.tensors),
        )
        self.secure = SecureRounds(config, wiring)
        self._download_encoding = encodings.NAMES[config.download_encoding]
        # A leaf aggregator (config.root set): its rounds follow the root's, and a round whose quorum
        # is in hands its sum up (aggregator/upstream.py) instead of averaging it here.
        self._leaf = bool(config.root)
        self._load()
        self._reconcile_visible()
        self._extend()

    # -- lifecycle -------------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)load everything from the store; uploads applied but not durable are dropped."""
        for spooled, _ in self._pending:
            spooled.discard()
        snap = self._store.load()
        self.manifest: Manifest | None = snap.manifest
        self._state = snap.state
        self.state_version = snap.state_version
        self._round = snap.round
        self._history = snap.history
        self._total = snap.total
        self._slots = snap.slots  # the server optimizer's state (aggregator/server_opt.py)
        self._visible = snap.visible  # the state edges hold; None: the global state itself
        self._changes = [Change.from_bytes(snap.changes[v]) for v in sorted(snap.changes)]
        self._peak = (-1, 0.0)  # (state version, its largest magnitude): see _state_peak
        if self.manifest is not None and self._total is None:
            self._total = np.zeros(self.manifest.size, dtype=np.float64)
        self._pending, self._logged = [], [entry for _, entry in snap.log]
        self._next_seq = snap.log[-1][0] + 1 if snap.log else 0
        if self._logged:  # the durable uploads since the stored sum, added again in their order
            specs, limit = self.manifest.tensors, self.config.max_chunk_bytes
            spool.replay(self._store.spool, self._logged, specs, self._total, limit)
        self.secure.load(snap.masked, self.manifest.size if self.manifest is not None else None)
        if self._round is not None:
            r = self._round
            logger.info(
                "resumed round %s (index %s): %s upload(s) committed, weight %s, state version %s",
                r.round_id, r.round_index, r.committed, r.weight, self.state_version
            )

    def _reconcile_visible(self) -> None:
        """Start the visible state over when the download encoding changed between float32 and a
        lossy one: from the global state (edges then download the full state once), or none."""
        lossy = encodings.is_lossy(self._download_encoding)
        if self.manifest is None or lossy == (self._visible is not None):
            return
        self._visible = self._state.copy() if lossy else None
        self._changes = []
        self._store.reset_visible(self._visible)
        logger.info("download encoding %s: visible state started over", self.config.download_encoding)

    def _extend(self) -> None:
        """A finished federation restarted with more total_rounds goes on: its next round opens
        from the final state, with the plan and server optimizer the configuration names now."""
        if self._leaf or self.manifest is None or self._round is not None or not self._history:
            return
        last = self._history[-1]
        if last.round_index + 1 >= self.config.total_rounds:
            return
        following = self._new_round(last.round_index + 1, self._clock(), self.state_version)
        self._store.save_round(following)
        self._round = following
        logger.info(
            "federation extended to %s rounds: round %s opened (index %s)",
            self.config.total_rounds, following.round_id, following.round_index
        )

    def start(self) -> None:
        """Start the round clock (deadlines, and a quorum reached just before a crash)."""
        self._ticker = threading.Thread(target=self._run_clock, name="round-clock", daemon=True)
        self._ticker.start()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the changing thread, lock held) on every change a long-poll
        may wait for: a round opened, closed or failed, a secure phase or confirmation, draining.

        The asyncio server's long-polls wake on it. An upload committed is not such a change, so
        a thousand edges waiting for their round to close are not woken by every upload."""
        last: list[tuple] = [()]

        def on_notify() -> None:
            now = self._epoch()
            if now != last[0]:
                last[0] = now
                listener()

        self._cond.listeners.append(on_notify)

    def _epoch(self) -> tuple:
        """What a waiting Join or GetSecureRound may be waiting on to change (O(1))."""
        r, sec = self._round, self._round.secure if self._round is not None else None
        return (
            self._polls.draining, self.state_version, self.manifest is not None,
            r.round_id if r else None, r.state if r else None,
            sec.phase if sec else None, len(sec.confirmations) if sec else 0,
        )  # fmt: skip

    def drain(self) -> None:
        """Refuse new joins and uploads; wake long-polls so they answer at once."""
        with self._cond:
            self._polls.draining = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Drain, stop the round clock and write pending notes."""
        self.drain()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._cond:
            self._write_notes()

    def _run_clock(self) -> None:
        failing = ""  # the error the clock keeps hitting: logged in full once, not every tick
        with self._cond:
            while not self._polls.draining:
                try:
                    self._tick()
                    if failing:
                        logger.info("round clock recovered")
                        failing = ""
                except Exception as exc:  # the clock must survive; the error is logged and retried
                    if repr(exc) != failing:
                        logger.exception("round clock failed; retrying every %s s", TICK_S)
                        failing = repr(exc)
                self._cond.wait(TICK_S)

    def _prepare_write(self) -> Callable[[], None]:
        """The group commit's write (lock held); returns what runs unlocked: the fsyncs."""
        self._notes_pending = False  # the record goes with the sum
        r = self._round
        if r is not None and r.secure is not None:
            return self._store.prepare_upload(r, None, self.secure.to_write())
        pending = self._pending
        logged = sum(e.size for e in self._logged) + sum(e.size for _, e in pending)
        if pending and (
            logged < spool.CHECKPOINT_FACTOR * self._total.nbytes
            and len(self._logged) + len(pending) <= spool.CHECKPOINT_ENTRIES
        ):
            self._pending = []
            entries = [(self._next_seq + k, entry) for k, (_, entry) in enumerate(pending)]
            self._next_seq += len(pending)
            self._logged += [entry for _, entry in pending]
            commit = self._store.prepare_upload(r, None, log=entries)
            files = [spooled for spooled, _ in pending]

            def sync_then_commit() -> None:
                try:
                    for spooled in files:
                        spooled.sync()
                    spool.sync_directory(self._store.spool)
                    commit()
                except BaseException as exc:
                    for spooled in files:  # their uploads are lost (CommitLost): nothing names them
                        spooled.discard()
                    if isinstance(exc, OSError):
                        raise self._store.unwritable("cannot write", exc) from exc
                    raise
                for spooled in files:
                    spooled.close()

            return sync_then_commit
        # a checkpoint: the sum holds every applied upload, so the log and its files go
        commit = self._store.prepare_upload(r, self._total)
        unlogged = [spooled.name for spooled, _ in pending]  # named by no durable log entry
        folded = self._fold_spool()

        def commit_then_drop() -> None:
            try:
                commit()
            except BaseException:
                spool.remove(self._store.spool, unlogged)
                raise
            spool.remove(self._store.spool, folded)

        return commit_then_drop

    def _maybe_close(self) -> None:
        """After a durable write: close the round at once if the quorum is in (secure: next phase)."""
        r = self._round
        if r is not None and r.state == OPEN and r.secure is not None:
            if self._commits.idle:
                self.secure.advance(self._clock())
        elif r is not None and r.state == OPEN and r.quorum_reached():
            self._aggregate(self._clock())

    def _tick(self) -> None:
        """Write pending notes; close or fail the open round when its quorum or deadline says so."""
        self._write_notes()
        r, now = self._round, self._clock()
        if r is None or r.state != OPEN or self._commits.flushing:
            return
        if r.secure is not None:
            if self._commits.idle:
                self.secure.advance(now)
            return
        if r.quorum_reached() or (r.past_deadline(now) and r.committed >= r.min_edges):
            self._aggregate(now)
        elif r.past_deadline(now):
            r.fail(now)
            self._retry(r, now)

    def _retry(self, r: RoundRecord, now: float) -> None:
        """Persist a failed round (state unchanged) and open its retry under a new id."""
        following = self._new_round(r.round_index, now, self.state_version)
        self._finish(r, None, self.state_version, following)
        self._history.append(r)
        self._round = following
        self.secure.clear()
        self._commits.mark_all_durable()  # the history record carries every applied upload
        logger.warning("round %s failed: %s; reopened as round %s", r.round_id, r.message, following.round_id)
        self._cond.notify_all()

    # -- rounds ----------------------------------------------------------------------------

    def _finish(
        self,
        r: RoundRecord,
        state: np.ndarray | None,
        version: int,
        following,
        visible: tuple[np.ndarray, bytes, list[int]] | None = None,
        slots: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Persist a round's end; on failure go back to what the disk holds."""
        try:
            self._store.finish_round(r, state, version, following, visible, slots)
            if r.secure is not None:
                r.secure.drop_blobs()  # kept on disk only until now; the history holds the core
            self._fold_spool()
            spool.remove_rounds_upto(self._store.spool, r.round_id)
        except Exception as exc:
            self._load()
            # uploads applied to the sum in memory but not yet written are gone with it
            self._commits.drop_pending(str(exc) or type(exc).__name__)
            raise

    @property
    def finished(self) -> bool:
        """True once every planned round closed."""
        return self.manifest is not None and self._round is None and not self._awaiting_root()

    def _awaiting_root(self) -> bool:
        """A leaf that knows the model but was not yet given its first round by the root."""
        return self._leaf and self._round is None and not self._history

    def _new_round(self, index: int, now: float, version: int) -> RoundRecord:
        last = max([h.round_id for h in self._history] + [self._round.round_id if self._round else 0])
        record = new_round(self.config, last + 1, index, now, version)
        if self._leaf and self._round is not None:  # a leaf's retry keeps the root's plan
            record.plan, record.total_rounds = copy.deepcopy(self._round.plan), self._round.total_rounds
        before = self._round.secure if self._round is not None else None
        if record.secure is not None and before is not None and before.bits:
            # a retry keeps the codes' range and sample cap; a close sets them anew (_aggregate)
            record.secure.code_range, record.secure.sample_cap = before.code_range, before.sample_cap
        return record

    def _size_codes(self, following: SecureRecord, closed: RoundRecord, state: np.ndarray) -> None:
        """The next secure round's codes: their range from this round's global increment, and the
        sample cap from this round's largest sample count (so its edges' codes keep full precision)."""
        change = (state - self._state)[~server_opt.exact_mask(self.manifest.tensors)]
        following.code_range = secagg.next_code_range(change, following.code_range, self.config.secagg_clip)
        counts = [e.samples for e in closed.edges.values() if e.uploaded]
        if following.hide_weights and counts:  # counts unseen: twice the mean weight, known now
            following.sample_cap = float(max(1.0, 2 * closed.weight / len(counts)))
        elif counts:
            following.sample_cap = float(max(1, max(counts)))

    def _aggregate(self, now: float, mean: np.ndarray | None = None) -> None:
        """W_{t+1} = W_t + sum / weight (Algorithm 2), persisted with the next round, atomically.

        ``mean``: a secure round's unmasked mean of the survivors' increments, float32 (n,).
        A leaf hands its sum up to the root instead (_hand_up).
        """
        if self._leaf:
            self._hand_up(now, mean)
            return
        r = self._round
        state = self._state.copy()
        slots = self._slots
        c = self.config
        if c.server_optimizer != "fedavg":  # the mean as a pseudo-gradient (Reddi et al. 2021)
            if mean is None:
                mean = self._total / r.weight
            slots = server_opt.step(
                c.server_optimizer, state, mean, slots, server_opt.exact_mask(self.manifest.tensors),
                c.server_step_lr, c.server_beta1, c.server_beta2, c.server_tau,
            )
        elif mean is not None:
            fedavg.apply_mean(state, mean.astype(np.float64), 1.0)
        else:
            fedavg.apply_mean(state, self._total, r.weight)
        r.close(now)
        version = self.state_version + 1
        following = None
        if r.round_index + 1 < self.config.total_rounds:
            following = self._new_round(r.round_index + 1, now, version)
            if following.secure is not None and following.secure.bits:
                self._size_codes(following.secure, r, state)
        visible, changes, written = self._visible, self._changes, None
        if visible is not None:  # a lossy download encoding: the change edges will download
            change, visible = encode_change(
                visible, state, version, self.manifest.tensors, self._download_encoding,
                self.config.zstd_level, self.config.chunk_elements,
            )
            changes = chain_to_keep([*changes, change], 4 * state.size)
            dropped = sorted({c.version for c in self._changes} - {c.version for c in changes})
            written = (visible, change.to_bytes(), dropped)
        self._finish(r, state, version, following, written, slots)
        self._state, self.state_version, self._round = state, version, following
        self._visible, self._changes, self._slots = visible, changes, slots
        self._history.append(r)
        self._total.fill(0.0)
        self.secure.clear()
        self._commits.mark_all_durable()  # the new state and history carry every applied upload
        logger.info(
            "round %s closed: %s upload(s), weight %s, state version %s%s",
            r.round_id, r.committed, r.weight, version, "" if following else "; federation finished"
        )
        if following is not None:
            n = self.config.total_rounds
            logger.info("round %s opened (index %s/%s)", following.round_id, following.round_index, n)
        self._cond.notify_all()

    # -- RPCs ------------------------------------------------------------------------------

    def join(self, edge_id: str, manifest: Manifest, wait_s: float) -> JoinResult:
        """Register the edge's model (the first manifest defines it) and long-poll for work."""
        until = self._clock() + max(0.0, min(wait_s, self.config.join_wait_max_s))
        with self._cond:
            self._polls.check_serving()
            self._match_or_init(manifest)
            while True:
                r = self._round
                if r is None and not self._awaiting_root():
                    return JoinResult("FINISHED", edge_id, self._history[-1], self.state_version)
                if (
                    r is not None
                    and r.state == OPEN
                    and not r.has_uploaded(edge_id)
                    and edge_id not in self._in_flight
                    and (r.secure is None or r.secure.takes_join(edge_id))
                ):
                    if edge_id not in r.edges:
                        r.join(edge_id, self._clock())
                        self._save_record()
                        logger.info("round %s: edge %s joined", r.round_id, edge_id)
                    return JoinResult("TRAIN", edge_id, r.brief(), self.state_version)
                remaining = until - self._clock()
                if remaining <= 0 or self._polls.draining:
                    brief = r.brief() if r is not None else None  # None: a leaf awaiting the root
                    return JoinResult("WAIT", edge_id, brief, self.state_version)
                self._cond.wait(min(remaining, TICK_S * 5))

    def _match_or_init(self, manifest: Manifest) -> None:
        if self.manifest is not None:
            self.manifest.check_same(manifest)
            return
        manifest.check_first(MAX_MODEL_VALUES)
        if self._leaf:  # stored with the root's first round (adopt); the relay joins with it
            self.manifest = manifest
            self._cond.notify_all()
            return
        self.manifest = manifest
        first = self._new_round(0, self._clock(), 1)
        self._open_model(np.zeros(manifest.size, dtype=np.float32), 1, first)  # DESIGN 2: G_0 = 0
        logger.info(
            "model registered: %s tensor(s), %s values; round %s opened",
            len(manifest.tensors), manifest.size, self._round.round_id
        )

    def _open_model(self, state: np.ndarray, version: int, first: RoundRecord) -> None:
        """Take ``state`` at ``version`` as the global state and ``first`` as the open round, in
        memory and then on disk: the federation's first round, or a leaf's first from its root."""
        self._state, self.state_version, self._round = state, version, first
        self._total = np.zeros(self.manifest.size, dtype=np.float64)
        self.secure.load(None, self.manifest.size)
        lossy = encodings.is_lossy(self._download_encoding)
        self._visible, self._changes, self._slots = (state.copy() if lossy else None), [], {}
        self._store.init_model(self.manifest, state, version, first, visible=lossy)
        self._cond.notify_all()

    def download(self, edge_id: str, held_version: int) -> StateStream:
        """The state edges train from: a header alone when the edge holds the current version, the
        chain of changes since its version when they are kept, else the full state in float32."""
        with self._cond:
            if self.manifest is None or self._awaiting_root():
                raise NotReady("no model yet: an edge must Join with its manifest first")
            state, version, specs = self._state, self.state_version, self.manifest.tensors
            if self._visible is not None:
                state = self._visible
            chain = [c for c in self._changes if c.version > held_version]
        if chain and held_version and chain[0].header.base_state_version == held_version:
            stream = chain_stream(chain)
        else:
            stream = self._cache.stream(state, version, specs, unchanged=held_version == version)
        stream.on_done = lambda moved: self._account_download(edge_id, moved)
        return stream

    def report_evaluation(self, edge_id: str, version: int, scores: dict[str, dict | None]) -> int:
        """Keep an edge's scores of state ``version`` in the record of the round that produced it
        (durable); a repeat replaces them. Returns that round's id."""
        if scores.get("generic") is None:
            raise MalformedRequest("an evaluation report needs the generic model's score")
        with self._cond:
            produced = [h for h in self._history if h.state == CLOSED and h.state_version + 1 == version]
            if not produced:
                raise UnknownRound(f"no closed round produced state version {version}")
            record = produced[-1]
            record.evaluations[edge_id] = scores
            self._store.save_history(record)
            return record.round_id

    def account(self, edge_id: str, moved: Bytes) -> None:
        """Count bytes sent to an edge outside a download (secure-aggregation replies)."""
        self._account_download(edge_id, moved)

    def _account_download(self, edge_id: str, moved: Bytes) -> None:
        with self._cond:
            record = self._round or (self._history[-1] if self._history else None)
            if record is not None:
                record.edge(edge_id).bytes.add(moved)
                try:  # a note on the bytes sent; a full disk must not fail the download itself
                    if record is self._round:
                        self._save_record()
                    else:
                        self._store.save_history(record)
                except StorageUnavailable as exc:
                    logger.warning("download by %s not recorded on disk: %s", edge_id, exc)

    def upload(self, edge_id: str, messages: Iterator[pb.UploadMessage], leaf: bool = False) -> Receipt:
        """Stage, verify, then add one increment into the running sum; durable before returning.

        ``leaf``: the caller is a leaf aggregator forwarding its edges' weighted sum (float64), whose
        weight is its sample_count; it adds to the sum as it is, as if its edges had uploaded here.
        """
        header = read_header(messages)
        t0 = time.perf_counter()
        with self._cond:
            self._polls.check_serving()
            if self.manifest is None or self._awaiting_root():
                raise NotReady("no model yet: Join first")
            self._check_upload(edge_id, header, leaf)
            specs = list(self.manifest.tensors)
            hidden = self._round.secure.hidden_count() if self._round.secure is not None else 0
            if leaf:
                weight = fedavg.sum_weight(header.sample_count)
            elif hidden:  # weights travel masked: the header declares none
                if header.sample_count:
                    raise MalformedRequest(
                        "this round hides weights: send sample_count 0 and the weight masked"
                    )
                weight = 0.0
                specs.append((secagg.WEIGHT_TENSOR_ID, hidden, True))
            else:
                weight = fedavg.weight_for(header.sample_count, self.config.weighting)
            plain = self._round.secure is None
            logged = plain and 8 * self.manifest.size >= self.config.log_uploads_from_bytes  # float64 sum
            self._in_flight.add(edge_id)
        try:
            if not self._uploads.acquire(timeout=self.config.upload_wait_s):
                raise Busy(f"{self.config.max_concurrent_uploads} uploads in progress; retry later")
            try:
                t1 = time.perf_counter()
                buffer = None  # (the finally below returns it)
                spooled = self._open_spool(header.round_id) if logged else None
                float32 = header.encoding != pb.ENCODING_FLOAT64  # what every plain encoding decodes to
                buffer = self._staging_buffer() if plain and float32 else None
                out = None if buffer is None else fedavg.split(buffer, self.manifest.lengths)
                try:
                    staged = stage(header, messages, specs, self.config.max_chunk_bytes, spooled, out)
                except BaseException as exc:
                    if spooled is None:
                        raise
                    spooled.discard()
                    if isinstance(exc, OSError):  # the spool file could not be written
                        raise self._store.unwritable("cannot write", exc) from exc
                    raise
                times = (t0, t1, time.perf_counter())
                return self._commit(edge_id, header, staged, weight, times, leaf, spooled)
            finally:
                if buffer is not None:
                    self._buffers.append(buffer)
                self._uploads.release()
        finally:
            with self._cond:
                self._in_flight.discard(edge_id)

    def _staging_buffer(self) -> np.ndarray:
        """A flat float32 buffer to decode a plain upload into, reused: a fresh model-sized array
        per upload costs its page faults (allocations of this size are mapped anew each time)."""
        size = self.manifest.size
        while self._buffers:
            buffer = self._buffers.pop()
            if buffer.size == size:
                return buffer
        return np.empty(size, dtype=np.float32)

    def _open_spool(self, round_id: int) -> SpoolFile:
        """A new spool file for a plain round's upload (StorageUnavailable if it cannot be made)."""
        try:
            return SpoolFile(self._store.spool, round_id)
        except OSError as exc:
            raise self._store.unwritable("cannot write", exc) from exc

    def _check_upload(self, edge_id: str, header: pb.UploadHeader, leaf: bool = False) -> None:
        if header.fingerprint != self.manifest.fingerprint:
            raise ModelMismatch("upload fingerprint differs from the federation's model")
        if leaf:
            if self.config.secure_aggregation:
                raise WrongMode("this federation runs secure aggregation: a leaf's plain sum is refused")
            if header.encoding != pb.ENCODING_FLOAT64:
                raise MalformedRequest(
                    "a leaf aggregator forwards its edges' sum in ENCODING_FLOAT64, "
                    f"not {encodings.name_of(header.encoding)}"
                )
        else:
            self.secure.check_encoding(header.encoding)
        r = self._round
        if r is None:
            rounds.check_after_the_last(self._history, header.round_id)
        r.check_upload(edge_id, header.round_id)
        if r.secure is not None:
            r.secure.check_upload(edge_id)
            r.secure.check_encoding(header.encoding)
        if edge_id in self._in_flight:
            raise DuplicateUpload(f"an upload from edge {edge_id!r} is already in progress")
        r.check_base(header.base_state_version)

    def _commit(
        self,
        edge_id: str,
        header: pb.UploadHeader,
        staged,
        weight: float,
        times: tuple[float, ...],
        leaf: bool = False,
        spooled: SpoolFile | None = None,
    ) -> Receipt:
        with self._cond:
            try:
                r = self._round
                if r is None:
                    raise RoundClosed(f"round {header.round_id} closed while the upload streamed")
                r.check_upload(edge_id, header.round_id)
                if r.secure is not None:
                    self.secure.add(r, edge_id, staged.arrays, weight)
                else:
                    if leaf:  # a sum of weighted increments: its mean is what must fit in float32
                        fedavg.check_sum_headroom(staged.peak, weight, self._state_peak())
                    else:
                        fedavg.check_headroom(self._state, staged.arrays, staged.peak, self._state_peak())
                    scale = 1.0 if leaf else weight  # a leaf's sum is weighted already
                    fedavg.accumulate_tensors(self._total, staged.arrays, self.manifest.lengths, scale)
                    if spooled is not None:  # written with the next durable write
                        codec = (header.encoding, header.compression)
                        entry = spooled.entry(scale, *codec, staged.chunks, staged.sha256)
                        self._pending.append((spooled, entry))
                        spooled = None
            finally:
                if spooled is not None:  # refused: its file goes
                    spooled.discard()
            moved = Bytes(raw_up=staged.raw_bytes, wire_up=staged.wire_bytes)
            r.commit(edge_id, header.sample_count, weight, moved, self._clock())
            committed = r.committed
            self._commits.wait_durable(self._commits.apply())  # the quorum check runs after the write
            t0, t1, t2 = times
            logger.info(
                "round %s: upload from %s committed (%s/%s, %s samples, %s wire bytes; "
                "%.3f s queued, %.3f s receive+verify, %.3f s sum+fsync)",
                r.round_id, edge_id, committed, r.quorum, header.sample_count, staged.wire_bytes,
                t1 - t0, t2 - t1, time.perf_counter() - t2
            )
            return Receipt(
                r.round_id, edge_id, staged.raw_bytes, staged.wire_bytes, committed, r.state, staged.sha256
            )

    def _fold_spool(self) -> list[str]:
        """The stored sum or state now holds every applied upload: forget the upload log (the
        next durable writes have nothing of it to write); returns the names of its files."""
        names = [e.file for e in self._logged] + [spooled.name for spooled, _ in self._pending]
        for spooled, _ in self._pending:
            spooled.close()
        self._logged, self._pending = [], []
        return names

    def _state_peak(self) -> float:
        """The largest magnitude in the global state, computed once per state version."""
        if self._peak[0] != self.state_version:
            self._peak = (self.state_version, fedavg.peak([self._state]))
        return self._peak[1]

    def _save_phase(self, r: RoundRecord) -> None:
        """Write a secure phase change at once; on failure go back to what the disk holds."""
        try:
            self._store.save_round(r)
        except Exception:
            self._load()  # the clock retries
            raise

    def _save_record(self) -> None:
        """Note that the round's record has join or download notes to persist.

        They are written by the round clock within a tick (one write for every note of the tick,
        where a write per note made a round of N joins write O(N^2) bytes), or with the next
        upload's durable write; never ahead of the durable sum. They are notes: a join or a
        download lost in a crash is repeated by the edge, and no receipt waits for them.
        """
        self._notes_pending = True

    def _write_notes(self) -> None:
        """Persist pending notes (round clock, lock held) unless a group commit is under way."""
        if not self._notes_pending or not self._commits.idle or self._round is None:
            return
        try:
            self._store.save_round(self._round)
            self._notes_pending = False
        except StorageUnavailable as exc:
            logger.warning("join and download notes not written (retried next tick): %s", exc)

    # -- a leaf's side of the second tier (aggregator/upstream.py calls these) ------------------

    def _hand_up(self, now: float, mean: np.ndarray | None = None) -> None:
        """A leaf's quorum is in: stop taking uploads and offer the sum to the relay (durable).

        ``mean``: a secure round's unmasked mean; the leaf forwards mean x weight, the sum of its
        survivors' weighted increments (what the root would have summed had they uploaded there).
        """
        r = self._round
        if mean is not None:
            np.multiply(mean, r.weight, out=self._total, dtype=np.float64)
        r.state = AGGREGATING
        r.message = f"the sum of {r.committed} upload(s) goes to the root"
        try:  # the sum with the record: a secure round's sum exists only from now on
            self._store.save_sum(r, self._total)
        except Exception:
            self._load()  # the clock retries
            raise
        spool.remove(self._store.spool, self._fold_spool())
        logger.info(
            "round %s: %s upload(s) in, weight %s; forwarding to the root", r.round_id, r.committed, r.weight
        )
        self._cond.notify_all()

    def wait_manifest(self, timeout: float) -> Manifest | None:
        """The model's manifest once an edge joined (None after ``timeout`` seconds without one)."""
        with self._cond:
            self._cond.wait_for(lambda: self.manifest is not None or self._polls.draining, timeout)
            return self.manifest

    def needs_state(self, version: int) -> bool:
        """Whether a leaf must adopt the root's state ``version``: it has no round yet, or another
        version."""
        with self._cond:
            return self._awaiting_root() or (self._round is not None and version != self.state_version)

    def current_round_id(self) -> int:
        """The id of the open (or AGGREGATING) round; 0 when there is none."""
        with self._cond:
            return self._round.round_id if self._round is not None else 0

    def wait_forwardable(self, timeout: float) -> Forward | None:
        """A leaf's round sum once its quorum or deadline closed it (None after ``timeout``)."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._round is not None and self._round.state == AGGREGATING, timeout
            )
            if not ready:
                return None
            r = self._round
            weight = max(1, round(r.weight))  # secure rounds with capped codes weigh in fractions
            return Forward(r.round_id, self._total.copy(), weight, r.committed, self.state_version)

    def _root_round(self, root: UpstreamRound, now: float, version: int) -> RoundRecord:
        """A leaf's new round: the root's index, plan and length, the leaf's own quorum and clock."""
        record = self._new_round(root.index, now, version)
        record.plan, record.total_rounds = root.plan, root.total_rounds
        return record

    def adopt(
        self, root: UpstreamRound, state: np.ndarray, version: int, counted: bool | None = None
    ) -> None:
        """A leaf takes the root's state ``version`` and the root's round (TRAIN) or end (FINISHED).

        The first time, this opens the leaf's first round. Later, it ends the leaf's round: CLOSED
        when the root acknowledged its sum, FAILED when the root's round closed without it.
        ``counted``: what the relay knows of the round's sum (True: acknowledged, False: refused,
        its round had closed; None: not known, as after a restart).
        """
        with self._cond:
            now, r = self._clock(), self._round
            state = np.ascontiguousarray(state, dtype=np.float32)
            if self._awaiting_root():
                if root.finished:
                    raise NotReady("the root's federation is over; this leaf has nothing to join")
                first = self._root_round(root, now, version)
                self._open_model(state, version, first)
                logger.info(
                    "root round index %s adopted at state version %s: round %s opened",
                    root.index,
                    version,
                    first.round_id,
                )
                return
            if r is None or version == self.state_version:
                return
            if r.state == AGGREGATING and counted is not False:
                r.close(now)
                r.message = (
                    f"the sum of {r.committed} upload(s) went to the root; root state version {version}"
                    if counted
                    else f"the sum of {r.committed} upload(s) was handed up before a restart; the root's "
                    f"round record says whether it counted it; root state version {version}"
                )
            else:
                r.state, r.closed_at = FAILED, now
                r.message = (
                    f"the root's round closed (state version {version}) before this leaf's sum reached "
                    f"it; {r.committed} upload(s) dropped"
                )
            following = None if root.finished else self._root_round(root, now, version)
            self._finish(r, state, version, following)
            self._state, self.state_version, self._round = state, version, following
            self._history.append(r)
            self._total.fill(0.0)
            self.secure.clear()
            self._commits.mark_all_durable()
            logger.info(
                "round %s ended (%s): root state version %s%s",
                r.round_id,
                r.state.lower(),
                version,
                "" if following else "; federation finished",
            )
            self._cond.notify_all()

    # -- status ----------------------------------------------------------------------------

    def round_status(self, round_id: int = 0) -> RoundRecord:
        """A copy of the round's record (0 = current; FINISHED after the last round)."""
        with self._cond:
            return copy.deepcopy(rounds.find(self._round, self._history, round_id))

    def all_rounds(self) -> tuple[list[RoundRecord], int]:
        """Copies of every round so far (history then current) and the state version."""
        with self._cond:
            rounds = list(self._history) + ([self._round] if self._round else [])
            return copy.deepcopy(rounds), self.state_version

    def global_state(self) -> np.ndarray | None:
        """The current flat global state (a reference; do not modify)."""
        with self._cond:
            return self._state


__all__ = ["CLOSED", "JoinResult", "Receipt", "RoundCoordinator"]
