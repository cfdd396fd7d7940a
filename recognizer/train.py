"""Training and evaluation loops: local epochs with Adadelta (Algorithm 1), loss, accuracy, prediction."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recognizer import charset, metrics

log = logging.getLogger(__name__)

# Teacher-forced cross entropy ignores padding; EOS is a target like any character (ASTER).
IGNORE_INDEX = charset.PAD


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the data did."""

    epoch: int
    loss: float
    samples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Word accuracy (case-insensitive, alphanumerics, as in the paper), 1-N.E.D. and teacher-forced loss."""

    accuracy: float
    loss: float
    samples: int
    predictions: list[str]
    labels: list[str]
    char_accuracy: float = 0.0  # 1 - normalized edit distance: partial credit


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over non-PAD positions.

    logits: [B, T, C] float; targets: [B, T] long (ids, EOS, then PAD).
    """
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


OPTIMIZERS = ("adadelta", "adam")
DEFAULT_LR = {"adadelta": 1.0, "adam": 1e-3}


def make_optimizer(model: nn.Module, lr: float, kind: str = "adadelta") -> torch.optim.Optimizer:
    """Adadelta as in the paper (initial lr 1.0, decayed by the caller), or Adam for short CPU runs."""
    if kind == "adadelta":
        return torch.optim.Adadelta(model.parameters(), lr=lr)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, base_lr: float, decay_at: Sequence[int]) -> float:
    """Learning rate after ``step`` rounds/epochs: x0.1 at the first decay point, x0.01 at the second..."""
    return base_lr * 0.1 ** sum(1 for d in decay_at if step >= d)


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int = 0,
    bf16: bool = False,
    grad_clip: float = 5.0,
    on_batch: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass of teacher-forced training over ``batches`` of (images, targets, labels).

    Raises FloatingPointError when the loss stops being finite, so a diverged model is never uploaded.
    """
    model.train()
    start = time.perf_counter()
    total, seen = 0.0, 0
    for step, (images, targets, _labels) in enumerate(batches):
        with _autocast(bf16):
            logits = model(images, targets)
        loss = sequence_loss(logits.float(), targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.item() * images.shape[0]
        seen += images.shape[0]
        if on_batch is not None:
            on_batch(step, loss.item())
    seconds = time.perf_counter() - start
    return EpochStats(epoch=epoch, loss=total / max(seen, 1), samples=seen, seconds=seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    *,
    beam_width: int = 5,
    bf16: bool = False,
) -> EvalResult:
    """Word accuracy of ``model.predict`` and mean teacher-forced loss over ``batches``."""
    model.eval()
    predictions: list[str] = []
    labels: list[str] = []
    loss_sum, seen = 0.0, 0
    for images, targets, batch_labels in batches:
        with _autocast(bf16):
            logits = model(images, targets)
            ids = model.predict(images, beam_width=beam_width)
        loss_sum += sequence_loss(logits.float(), targets).item() * images.shape[0]
        seen += images.shape[0]
        predictions.extend(charset.decode(seq) for seq in ids)
        labels.extend(batch_labels)
    return EvalResult(
        accuracy=metrics.word_accuracy(predictions, labels) if labels else 0.0,
        char_accuracy=metrics.char_accuracy(predictions, labels) if labels else 0.0,
        loss=loss_sum / max(seen, 1),
        samples=seen,
        predictions=predictions,
        labels=labels,
    )
