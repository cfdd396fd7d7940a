"""The edge's local model: W_0 from the key, the global state applied on top, local epochs, the increment.

Everything here stays on the edge. The vectors it hands out (``length``, ``fingerprint`` and the
increment) are in the keyed packed layout, which the aggregator can average but not decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from recognizer import state, train
from recognizer.charset import MAX_SEQ_LEN
from recognizer.dataset import label_report, make_loader
from recognizer.image_crypt import BlockCipher, align_model
from recognizer.lmdb_data import LmdbReader
from recognizer.model import build_model
from recognizer.model_io import save_model, start_from
from recognizer.recipe import DEFAULT_LR, DEFAULT_OPTIMIZER, OPTIMIZERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the aggregator asks of one round (the wire's TrainingPlan)."""

    local_epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str = ""  # "" keeps the edge's own (--optimizer)
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_round||^2 joins the loss (0: off)


class LocalModel:
    """The hashed recognizer of one edge and its private shard.

    The edge's model is always ``W_0 + G``: W_0 comes from the federation key (the same on every
    edge, or the pretrained weights of ``init``) and G is the global state the aggregator averages;
    ``increment()`` is ``W_local - W_0 - G``.
    The model trains on ``device`` (with bf16 autocast when ``bf16``); every vector it hands out is
    CPU float32 whatever the device.
    """

    def __init__(
        self,
        shard: Path,
        key: bytes,
        preset: str,
        gamma: float | None,
        *,
        optimizer: str = DEFAULT_OPTIMIZER,
        alphabet: str | None = None,
        workers: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        bf16: bool = False,
        init: Path | None = None,
        cipher: BlockCipher | None = None,
    ) -> None:
        reader = LmdbReader(shard)  # a missing or corrupt shard fails here, naming the path
        self.model = build_model(preset, key, gamma, alphabet)
        try:
            self.samples = len(reader)
            # Before joining, not after the first round: unreadable labels fail, folded ones are counted.
            self.labels = label_report(reader, self.model.alphabet, MAX_SEQ_LEN)
        finally:
            reader.close()
        self.shard = shard
        self.preset = preset
        self._key = key
        self._file_fingerprint = state.fingerprint(self.model, key)  # of W_0 as built: model files name it
        if init is not None:  # fine-tuning: the pretrained weights stand in for W_0 on every edge
            start_from(self.model, init, key, preset, self._file_fingerprint)
        if cipher is not None:  # it reads the shard's encrypted images (recognizer.image_crypt.align_model)
            align_model(self.model, cipher)
        # Of the starting point: edges that start from other weights are refused, like another key.
        self.fingerprint = state.fingerprint(self.model, key)
        self._w0 = state.pack_model(self.model, key)
        self.statistics = state.statistics_length(self.model)  # the packed vector's last values
        self._base = self._w0.copy()  # W_0 + G of the last global state applied
        # W_0, the fingerprint and every vector handed out are CPU float32; only the model moves.
        self.device = torch.device(device)
        self.model.to(self.device)  # before the optimizer, which keeps its state beside the parameters
        self._bf16 = bf16
        self._optimizer = train.make_optimizer(self.model, DEFAULT_LR[optimizer], optimizer)
        self._optimizer_kind = optimizer
        self._own_optimizer: torch.optim.Optimizer | None = None  # the own model's (train_own)
        self._warned_lr = False
        self._workers = workers
        self._seed = seed
        self._rounds_trained = 0

    @property
    def optimizer_kind(self) -> str:
        """The local optimizer's name (recognizer.recipe.OPTIMIZERS)."""
        return self._optimizer_kind

    @property
    def base(self) -> np.ndarray:
        """``W_0 + G`` of the last global state applied, packed (a copy)."""
        return self._base.copy()

    @property
    def length(self) -> int:
        """Number of values in the packed state (parameters, then ``statistics`` running statistics)."""
        return int(self._w0.size)

    def apply_global(self, global_state: np.ndarray) -> None:
        """Set the model to ``W_0 + global_state`` (a packed vector from the aggregator)."""
        if global_state.shape != self._w0.shape:
            raise ValueError(f"global state has {global_state.size} values, this model has {self._w0.size}")
        self._base = self._w0 + global_state
        state.load_packed(self.model, self._base, self._key)

    def use_optimizer(self, kind: str) -> None:
        """Switch the local optimizer to ``kind`` (fresh state); "" or the current one changes nothing.

        Raises:
            ValueError: ``kind`` is not one of recognizer.recipe.OPTIMIZERS.
        """
        if not kind or kind == self._optimizer_kind:
            return
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer {kind!r} is unknown here; this edge knows {', '.join(OPTIMIZERS)}")
        log.info("switching the local optimizer from %s to %s", self._optimizer_kind, kind)
        self._optimizer = train.make_optimizer(self.model, DEFAULT_LR[kind], kind)
        self._optimizer_kind = kind
        self._own_optimizer = None
        self._warned_lr = False

    def train_round(
        self,
        plan: Plan,
        on_epoch: Callable[[train.EpochStats], None] | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
        data: Path | Sequence[Path] | None = None,
        take: Sequence[int | None] | None = None,
    ) -> list[train.EpochStats]:
        """Run ``plan.local_epochs`` epochs over the shard, or over ``data`` (a warm-up round's
        words; or the shard and the warm-up words, ``take`` of each drawn anew each round: None is
        all), as Algorithm 1's ClientUpdate.

        ``on_batch(epoch, step, loss)`` and ``on_epoch(stats)`` report progress.
        """
        usual = DEFAULT_LR[self._optimizer_kind]
        if not self._warned_lr and not usual / 30 <= plan.learning_rate <= usual * 30:
            # The plan's lr comes from the aggregator, the optimizer from this edge's --optimizer.
            log.warning(
                "the round's learning rate %g is far from %s's usual %g: does the aggregator's plan "
                "match this edge's --optimizer?",
                plan.learning_rate,
                self._optimizer_kind,
                usual,
            )
            self._warned_lr = True
        proximal = train.Proximal.around(self.model, plan.proximal_mu) if plan.proximal_mu > 0 else None
        seed = self._rounds_trained
        history = self._epochs(plan, self._optimizer, proximal, data, on_epoch, on_batch, seed, take)
        self._rounds_trained += 1
        return history

    def train_own(self, own: np.ndarray, plan: Plan, lam: float) -> np.ndarray:
        """Train the edge's own model (Ditto, Li et al. 2021) one round: from the packed weights
        ``own``, ``plan.local_epochs`` over the shard with lam/2 ||w - (W_0 + G)||^2 pulling it toward
        the global model, by an optimizer of its own. Returns its new packed weights; the model is
        left as it was, so the upload does not change."""
        before = self.packed()
        self.load(self._base)  # the anchor of the pull
        proximal = train.Proximal.around(self.model, lam) if lam > 0 else None
        self.load(own)
        if self._own_optimizer is None:
            self._own_optimizer = train.make_optimizer(
                self.model, DEFAULT_LR[self._optimizer_kind], self._optimizer_kind
            )
        try:
            # Another shuffle than the global model's fine-tune of the same round.
            self._epochs(replace(plan, proximal_mu=0.0), self._own_optimizer, proximal, None, None, None,
                         self._rounds_trained + 1_000_003)
            return self.packed()
        finally:
            self.load(before)

    def _epochs(
        self,
        plan: Plan,
        optimizer: torch.optim.Optimizer,
        proximal: train.Proximal | None,
        data: Path | None,
        on_epoch: Callable[[train.EpochStats], None] | None,
        on_batch: Callable[[int, int, float], None] | None,
        seed: int,
        take: Sequence[int | None] | None = None,
    ) -> list[train.EpochStats]:
        train.set_lr(optimizer, plan.learning_rate)
        loader = make_loader(
            data or self.shard,
            plan.batch_size,
            take=take,
            shuffle=True,
            workers=self._workers,
            seed=self._seed + seed,
            pin_memory=self.device.type == "cuda",
            **self.model.image_options,
        )
        history = []
        for epoch in range(plan.local_epochs):
            batch_cb = (lambda step, loss, e=epoch: on_batch(e, step, loss)) if on_batch else None
            stats = train.train_epoch(
                self.model,
                loader,
                optimizer,
                epoch=epoch,
                on_batch=batch_cb,
                bf16=self._bf16,
                device=self.device,
                proximal=proximal,
            )
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
        return history

    def evaluate(self, data: Path, batch_size: int = 64, beam_width: int = 1) -> train.EvalResult:
        """Word accuracy and loss of the model as it is now on a local held-out LMDB."""
        loader = make_loader(
            data,
            batch_size,
            shuffle=False,
            pin_memory=self.device.type == "cuda",
            **self.model.image_options,
        )
        return train.evaluate(self.model, loader, beam_width=beam_width, device=self.device)

    def packed(self) -> np.ndarray:
        """The model as it is now, in the packed layout (``W_0 + G + increment``)."""
        return state.pack_model(self.model, self._key)

    def load(self, packed: np.ndarray) -> None:
        """Set the model to a packed vector (from ``packed``), keeping the global state it started from."""
        state.load_packed(self.model, packed, self._key)

    def mix(self, trained: np.ndarray, weight: float) -> None:
        """Set the model to ``W_0 + G + weight * (trained - W_0 - G)``: 0 is the global model, 1 is
        ``trained`` (a vector from ``packed``)."""
        self.load(trained if weight == 1 else self._base + np.float32(weight) * (trained - self._base))

    def increment(self) -> np.ndarray:
        """``W_local - (W_0 + G)`` in the packed layout: what the edge uploads."""
        return (self.packed() - self._base).astype(np.float32, copy=False)

    def save(self, path: Path) -> None:
        """Write the model as it is now (after apply_global: the global model) for `recognizer eval`."""
        save_model(path, self.model, self._key, self.preset, self._file_fingerprint)


def set_threads(threads: int) -> None:
    """Limit torch's intra-op threads (several agents on one machine share its cores)."""
    torch.set_num_threads(max(1, threads))
