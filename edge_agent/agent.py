"""The edge's loop: join, download, train local epochs, upload the increment, until the federation ends."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.feedback import RESIDUAL_FILE, Residual
from edge_agent.local import LocalModel, Plan
from edge_agent.report import Journal, Progress, megabytes
from edge_agent.secure import protocol
from edge_agent.warmup import warmup_data
from fedocr import encodings, retry, secagg
from fedocr.client import FEEDBACK_ROUNDING, UPLOAD_ROUNDING, FederationClient, Upload, UploadUnconfirmed
from fedocr.v1 import federation_pb2 as pb
from recognizer.model_io import ModelFileError, read_model_file
from recognizer.recipe import DEFAULT_LR

log = logging.getLogger(__name__)

# An upload refused with these means the round moved on: log it and join the next one.
ROUND_GONE = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})

JOURNAL_FILE = "rounds.jsonl"
FINAL_MODEL_FILE = "final.npz"
PERSONAL_MODEL_FILE = "personal.npz"
# The edge's own model (Ditto): trained each round from its last weights, a candidate personal model.
OWN_MODEL_FILE = "own.npz"
# Weights of the local fine-tune in the personal model, W_0 + G + w * increment; 0 keeps the global
# model, so on the held-out set the personal model never reads worse than the generic one.
PERSONAL_MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


class AgentError(RuntimeError):
    """The federation refused this edge for good (wrong model, certificate or request)."""


@dataclass(frozen=True)
class AgentSettings:
    """How the loop behaves (the model, data and endpoint are built by the caller)."""

    work_dir: Path
    final_model: Path
    join_wait_s: int = 30
    zstd_level: int = 3
    val: Path | None = None  # a local held-out LMDB: the global model is scored on it each round
    report_evaluation: bool = True  # send those scores to the aggregator (federated evaluation)
    # A personalized model beside the generic one, never uploaded: each round's local fine-tune of
    # the global model on this edge's shard, written here (FedAvg with local adaptation). With a
    # held-out set, the point between the global model and its fine-tune (PERSONAL_MIXES) that reads
    # the held-out set best.
    personal_model: Path | None = None
    # With a personal model and a held-out set: also keep the edge's own model (OWN_MODEL_FILE; Ditto,
    # Li et al. 2021), trained one round on the shard from its last weights each round, pulled toward
    # the global model with own_prox/2 ||w - (W_0 + G)||^2; it becomes the personal model where it
    # reads the held-out set better than every mix. None keeps no own model.
    own_prox: float | None = None
    # The personal model's last fine-tune, of the final global model: its epochs (each a candidate
    # with a held-out set) and lr (None: the local optimizer's usual lr, the one the rounds start at).
    # As many epochs as the owners' rounds of experiments.owners at their lr: meters, the owner with
    # most data, read 87.0% against 81.0% at 4 epochs of a tenth of it (docs/results/owners.md).
    personal_epochs: int = 8
    personal_lr: float | None = None
    # The common image key's encryption (edge_agent/encrypted.py): warm-up words are encrypted too.
    encryption: Any = None


class EdgeAgent:
    """Runs one edge until the aggregator says the federation is finished.

    The model the edge trains each round is ``W_0 + G`` of the round's global state G; the edge
    keeps G in memory and downloads it only when the round's state version differs from the
    one it holds.
    """

    def __init__(
        self, local: LocalModel, client: FederationClient, settings: AgentSettings, progress: Progress
    ) -> None:
        self.local = local
        self.client = client
        self.settings = settings
        self.progress = progress
        self.journal = Journal(settings.work_dir / JOURNAL_FILE)
        self.residual = Residual(settings.work_dir / RESIDUAL_FILE, local.length, local.fingerprint)
        self.held_version = 0
        self._global = np.zeros(local.length, dtype=np.float32)
        self._waiting_after: int | None = None
        self._last_plan: Plan | None = None  # the last round's plan: the personal model's fine-tune

    def run(self) -> Path:
        """Take part in rounds until the federation finishes; returns the final model's path.

        Raises:
            AgentError: the aggregator refused this edge for a reason a retry cannot fix.
            grpc.RpcError: the aggregator stayed unreachable past the retry policy's patience.
        """
        while True:
            reply = self._call(
                self.client.join,
                self.local.length,
                self.local.fingerprint,
                self.held_version,
                self.settings.join_wait_s,
                self.local.statistics,
            )
            if reply.action == pb.JoinResponse.ACTION_FINISHED:
                return self._finish(reply)
            if reply.action == pb.JoinResponse.ACTION_TRAIN:
                self._waiting_after = None
                self._train_round(reply)
            elif self._waiting_after != reply.round_id:
                self._waiting_after = reply.round_id
                self.progress.info(
                    "round %s (%s): waiting for the next round", reply.round_id, _position(reply)
                )

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the aggregator; a non-transient refusal becomes an AgentError with the server's reason."""
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            code = retry.status_code(exc)
            if code in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                details = exc.details() if hasattr(exc, "details") else str(exc)
                raise AgentError(f"the aggregator refused this edge ({code.name}): {details}") from exc
            raise

    def _sync(self, version: int) -> dict[str, int]:
        """Hold global state ``version`` (downloading it unless held) and load it into the model."""
        moved = {"raw": 0, "wire": 0}
        if version != self.held_version:
            started = time.perf_counter()
            download = self._call(self.client.download, self.held_version, self._global)
            if download is not None:
                self._global, self.held_version = download.vector, download.version
                moved = {"raw": download.moved.raw, "wire": download.moved.wire}
                self.progress.moved(down_raw=download.moved.raw, down_wire=download.moved.wire)
                self.progress.info(
                    "downloaded global state v%d: %s wire, %s raw, in %.1f s",
                    download.version,
                    megabytes(download.moved.wire),
                    megabytes(download.moved.raw),
                    time.perf_counter() - started,
                )
        self.local.apply_global(self._global)
        return moved

    def _score(self, what: str) -> Any:
        """The model as it is now scored on the held-out set (an EvalResult), when one was given."""
        if self.settings.val is None:
            return None
        result = self.local.evaluate(self.settings.val)
        self.progress.info(
            "%s on %s: accuracy %.1f%%, 1-NED %.3f, loss %.3f (%d words)",
            what,
            self.settings.val,
            100 * result.accuracy,
            result.char_accuracy,
            result.loss,
            result.samples,
        )
        return result

    def _report(self, version: int, generic: Any, personal: Any = None) -> None:
        """Send the scores of global state ``version`` (and of the personal model made from it) to the
        aggregator, unless the edge opted out (federated evaluation)."""
        if generic is None or not self.settings.report_evaluation or version <= 1:  # v1 is W_0
            return
        try:
            self.client.report_evaluation(version, generic, personal)
        except grpc.RpcError as exc:  # the score is a courtesy: it never stops training
            log.warning("could not report the score of v%d to the aggregator: %s", version, exc)

    def _personalize(
        self, generic: Any, plan: Plan, fine_tunes: Sequence[np.ndarray]
    ) -> tuple[Any, dict[str, Any]]:
        """Write the personal model: the model as trained now (the last of ``fine_tunes``, local
        fine-tunes of the global model, whose held-out score is ``generic``), or, with a held-out
        set, the candidate that reads it best: the global model, a mix of it and one of its
        fine-tunes (PERSONAL_MIXES; ties: the earliest fine-tune, the least of it), or the edge's own
        model (``own_prox``) where it reads better than every mix. Returns its score and the
        journal's record of the choice.

        The model is left as trained, so the upload is the same with personalization on or off.
        """
        path = self.settings.personal_model
        if path is None:
            return None, {}
        if generic is None:  # nothing to choose by
            self.local.save(path)
            return self._score(f"personal model ({path.name})"), {"personal_mix": 1.0}
        trained = fine_tunes[-1]
        chosen, best = generic, (trained, 0.0)  # (fine-tune, weight); weight 0 is the global model
        record: dict[str, Any] = {"personal_mix": 0.0, "personal_choice": "mix", "personal_epoch": 0}
        for epoch, tuned in enumerate(fine_tunes, 1):
            for weight in PERSONAL_MIXES[1:]:
                self.local.mix(tuned, weight)
                what = f"fine-tune {epoch}/{len(fine_tunes)}" if len(fine_tunes) > 1 else "its fine-tune"
                score = self._score(f"the global model + {weight:g} x {what}")
                if (score.accuracy, -score.loss) > (chosen.accuracy, -chosen.loss):
                    chosen, best = score, (tuned, weight)
                    record.update(personal_mix=weight, personal_epoch=epoch)
        if self.settings.own_prox is not None:
            own = self._train_own(plan, self.settings.own_prox)  # the model is left at it
            record["own_val"] = _scores(own)
            if (own.accuracy, -own.loss) > (chosen.accuracy, -chosen.loss):
                chosen, record["personal_mix"], record["personal_choice"] = own, None, "own"
        if record["personal_choice"] == "mix":
            self.local.mix(*best)
        self.local.save(path)
        self.local.load(trained)
        if record["personal_choice"] == "own":
            said = "this edge's own model"
        else:
            said = f"the global model + {record['personal_mix']:g} x fine-tune {record['personal_epoch']}"
        self.progress.info("personal model (%s): %s", path.name, said)
        return chosen, record

    def _train_own(self, plan: Plan, lam: float) -> Any:
        """Train the edge's own model one round (from OWN_MODEL_FILE, or from the global model the
        first time), write it, and leave the model at it. Returns its held-out score."""
        path = self.settings.work_dir / OWN_MODEL_FILE
        if path.exists():
            try:
                own = read_model_file(path)[1]
            except ModelFileError as exc:
                raise AgentError(f"this edge's own model cannot be read: {exc}") from exc
            if own.size != self.local.length:
                raise AgentError(f"{path}: {own.size} values, this model has {self.local.length}; "
                                 "another model's work directory?")
        else:
            own = self.local.base
        self.local.load(self.local.train_own(own, plan, lam))
        self.local.save(path)
        return self._score(f"own model ({path.name}, pulled toward the global model at {lam:g})")

    def _warmup_words(self, where: str, edge_id: str, words: pb.WarmUp) -> Path:
        """This edge's warm-up words (rendered on first use), encrypted as its shard is."""
        try:
            said = "%s: rendering warm-up words: %d/%d"
            data = warmup_data(
                self.settings.work_dir, edge_id, words,
                lambda done, total: self.progress.info(said, where, done, total),
            )
            if self.settings.encryption is not None:
                data = self.settings.encryption.copy_of(data, self.settings.work_dir)
            return data
        except ValueError as exc:
            raise AgentError(f"{where}: the round's warm-up words cannot be rendered: {exc}") from exc

    def _train_round(self, reply: pb.JoinResponse) -> None:
        where = f"round {reply.round_id} ({_position(reply)})"
        started = time.perf_counter()
        down = self._sync(reply.state_version)
        version = self.held_version
        generic = self._score(f"global state v{version}")
        plan = Plan(
            reply.plan.local_epochs, reply.plan.learning_rate, reply.plan.batch_size, reply.plan.optimizer,
            reply.plan.proximal_mu,
        )
        encoding = reply.plan.encoding or pb.ENCODING_FLOAT32
        secure = reply.plan.secure.enabled  # masked upload (edge_agent/secure/protocol.py)
        if not secure and encoding not in encodings.NAMES.values():
            name = encodings.name_of(encoding)
            raise AgentError(f"{where}: the round's plan asks for encoding {name}, unknown here")
        # Error feedback where the upload drops precision: a lossy encoding, or secure codes of b bits.
        lossy = reply.plan.secure.bits > 0 if secure else encodings.is_lossy(encoding)
        feedback = reply.plan.error_feedback and lossy
        rounding = FEEDBACK_ROUNDING if feedback else UPLOAD_ROUNDING  # of plain quantized uploads
        try:
            self.local.use_optimizer(plan.optimizer)
        except ValueError as exc:
            raise AgentError(f"{where}: the round's plan cannot be followed: {exc}") from exc
        data: Path | list[Path] = self.local.shard
        samples, take, rehearsed = self.local.samples, None, 0
        warmup = reply.plan.warmup if reply.plan.warmup.words else None
        rehearsal = reply.plan.rehearsal if reply.plan.HasField("rehearsal") else None
        if warmup is not None:
            data, samples = self._warmup_words(where, reply.edge_id, warmup), warmup.words
        elif rehearsal is not None:
            if not (0 < rehearsal.share < math.inf and rehearsal.words.words):
                raise AgentError(f"{where}: the round's plan cannot be followed: rehearsal share "
                                 f"{rehearsal.share} of {rehearsal.words.words} warm-up words")
            rehearsed = min(rehearsal.words.words, max(1, round(rehearsal.share * samples)))
            data = [self.local.shard, self._warmup_words(where, reply.edge_id, rehearsal.words)]
            take = [None, rehearsed]
        steps = -(-(samples + rehearsed) // max(1, plan.batch_size))
        record: dict[str, Any] = {
            "event": "round",
            "round_id": reply.round_id,
            "round_index": reply.round_index,
            "edge_id": reply.edge_id,
            "state_version": self.held_version,
            "samples": samples,
            "warmup": warmup is not None,
            "rehearsed": rehearsed,  # warm-up words drawn beside the shard (FedAvg weighs the shard alone)
            "plan": {
                "local_epochs": plan.local_epochs,
                "learning_rate": plan.learning_rate,
                "batch_size": plan.batch_size,
                "optimizer": plan.optimizer,
                "encoding": encodings.name_of(encoding),
                "error_feedback": feedback,
                "proximal_mu": plan.proximal_mu,
            },
            # Secure codes round stochastically in their own encoder; float32 rounds nothing.
            "rounding": rounding if lossy and not secure else None,
            "down": down,
            "val": _scores(generic),
            "up": {"raw": 0, "wire": 0},
            "epochs": [],
        }
        self.progress.info(
            "%s: training %d epoch(s) at lr %g on %d %swords%s",
            where,
            plan.local_epochs,
            plan.learning_rate,
            samples,
            "rendered warm-up " if warmup is not None else "",
            f" and {rehearsed} warm-up words" if rehearsed else "",
        )
        try:
            history = self.local.train_round(
                plan,
                on_epoch=lambda s: self.progress.info(
                    "%s epoch %d/%d: loss %.3f, %.0f images/s, %.1f s",
                    where,
                    s.epoch + 1,
                    plan.local_epochs,
                    s.loss,
                    s.images_per_second,
                    s.seconds,
                ),
                on_batch=lambda e, step, loss: self.progress.batch(
                    f"{where} epoch {e + 1}/{plan.local_epochs}", step, steps, loss
                ),
                data=data,
                take=take,
            )
        except FloatingPointError as exc:
            # A diverged model is never uploaded; the next round starts again from the global state.
            log.error("%s: training diverged (%s); skipping this round", where, exc)
            self.journal.write({**record, "status": "diverged", "error": str(exc)})
            self._waiting_after = reply.round_id
            return
        record["epochs"] = [
            {
                "loss": round(s.loss, 5),
                "images_per_s": round(s.images_per_second, 1),
                "seconds": round(s.seconds, 2),
            }
            for s in history
        ]
        personal = None
        if warmup is None and self.settings.personal_model is not None:  # it learns this edge's words
            self._last_plan = plan
            personal, choice = self._personalize(generic, plan, [self.local.packed()])
            record["personal_val"] = _scores(personal)
            record.update(choice)
        self._report(version, generic, personal)
        increment = self.local.increment()
        sent = self.residual.add_to(increment) if feedback else increment
        seed = int.from_bytes(hashlib.sha256(f"{reply.edge_id}/{reply.round_id}".encode()).digest()[:8])
        try:
            if secure:
                upload = self._call(self._secure_upload, reply, sent, samples)
            else:
                upload = self._call(
                    self.client.upload,
                    reply.round_id,
                    reply.edge_id,
                    sent,
                    samples,
                    self.local.fingerprint,
                    self.held_version,
                    self.settings.zstd_level,
                    encoding,
                    seed,
                    self.local.statistics,
                    rounding=rounding,
                )
        except grpc.RpcError as exc:
            if retry.status_code(exc) not in ROUND_GONE:
                raise
            log.warning("%s: upload refused as late (%s); waiting for the next round", where, exc.details())
            self.journal.write(
                {
                    **record,
                    "status": "late",
                    "error": exc.details(),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            return
        except (UploadUnconfirmed, protocol.RoundLeft, secagg.SecAggError) as exc:
            # An upload the server keeps reporting in progress, a secure round that went on without
            # this edge, or a roster, share or ciphertext it cannot accept: the round goes on without it.
            log.warning("%s: %s; waiting for the next round", where, exc)
            status = "unconfirmed" if isinstance(exc, UploadUnconfirmed) else "dropped"
            self.journal.write({**record, "status": status, "error": str(exc)})
            return
        if feedback:
            self.residual.keep(sent, upload.decoded)
        elif self.residual.values.any():
            self.residual.clear()
        self.progress.moved(up_raw=upload.moved.raw, up_wire=upload.moved.wire)
        record["up"] = {"raw": upload.moved.raw, "wire": upload.moved.wire}
        record["seconds"] = round(time.perf_counter() - started, 2)
        receipt = upload.receipt
        if receipt is None:
            record["status"] = "duplicate"
            counted = "already counted"
        else:
            record["status"] = "counted"
            record["receipt"] = {
                "round_id": receipt.round_id,
                "edge_id": receipt.edge_id,
                "raw_bytes": receipt.raw_bytes,
                "wire_bytes": receipt.wire_bytes,
                "committed_edges": receipt.committed_edges,
                "sha256": receipt.sha256.hex(),
            }
            counted = f"{receipt.committed_edges} edge(s) counted so far"
        self.journal.write(record)
        self.progress.summary(
            "%s: loss %.3f, %.0f images/s; up %s wire (%s raw), down %s wire; %s; %.1f s",
            where,
            history[-1].loss if history else float("nan"),
            history[-1].images_per_second if history else 0.0,
            megabytes(upload.moved.wire),
            megabytes(upload.moved.raw),
            megabytes(down["wire"]),
            counted,
            record["seconds"],
        )

    def _secure_upload(self, reply: pb.JoinResponse, increment: np.ndarray, samples: int) -> Upload:
        """The round's masked upload and the phases around it; the counted upload."""
        result = protocol.run(
            self.client,
            reply,
            increment,
            samples,
            self.local.fingerprint,
            self.held_version,
            self.local.statistics,
            self.settings.zstd_level,
            on_step=lambda step: self.progress.info("round %s: secure aggregation: %s", reply.round_id, step),
        )
        return result.upload

    def _finish(self, reply: pb.JoinResponse) -> Path:
        down = self._sync(reply.state_version)
        path = self.settings.final_model
        self.local.save(path)
        generic = self._score(f"global state v{self.held_version}")
        personal, choice = None, {}
        if self.settings.personal_model is not None and self._last_plan is not None:
            # The last round's lr has often decayed to almost nothing: the personal model's last
            # fine-tune has its own lr and epochs, each epoch a candidate.
            lr = self.settings.personal_lr or DEFAULT_LR[self.local.optimizer_kind]
            plan = replace(self._last_plan, local_epochs=1, learning_rate=lr, proximal_mu=0.0)
            epochs = self.settings.personal_epochs
            fine_tunes = []
            for epoch in range(epochs):
                self.progress.info("personal model: fine-tuning the final global model on this edge's shard, "
                                   "epoch %d/%d at lr %g", epoch + 1, epochs, plan.learning_rate)
                self.local.train_round(plan)
                fine_tunes.append(self.local.packed())
            personal, choice = self._personalize(generic, self._last_plan, fine_tunes)
        self._report(self.held_version, generic, personal)
        self.journal.write(
            {
                "event": "finished",
                "state_version": self.held_version,
                "down": down,
                "val": _scores(generic),
                "personal_val": _scores(personal),
                "personal_mix": None,
                **choice,
                "model": str(path),
                "personal_model": str(self.settings.personal_model) if personal is not None else None,
            }
        )
        p = self.progress
        p.summary(
            "federation finished: global state v%d written to %s; this edge moved %s up and %s down (wire)",
            self.held_version,
            path,
            megabytes(p.up_wire),
            megabytes(p.down_wire),
        )
        return path


def _scores(result: Any) -> dict[str, float] | None:
    """The journal's record of an EvalResult (None stays None)."""
    if result is None:
        return None
    return {"accuracy": result.accuracy, "char_accuracy": result.char_accuracy, "loss": result.loss,
            "samples": result.samples}


def _position(reply: pb.JoinResponse) -> str:
    return f"{reply.round_index + 1}/{reply.total_rounds}"
