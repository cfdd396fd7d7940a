"""Training and evaluation loops: local epochs with Adadelta (Algorithm 1), loss, accuracy, prediction."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recognizer import metrics
from recognizer.decoder import sequence_loss
from recognizer.progress import Progress
from recognizer.recipe import OPTIMIZERS

log = logging.getLogger(__name__)

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


ADAMW_WEIGHT_DECAY = 0.01


def make_optimizer(model: nn.Module, lr: float, kind: str = "adadelta") -> torch.optim.Optimizer:
    """Adadelta as in the paper (initial lr 1.0, decayed by the caller), Adam, or AdamW (decay 0.01)."""
    if kind == "adadelta":
        return torch.optim.Adadelta(model.parameters(), lr=lr)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr factor of optimizer step ``step`` (0-based): a linear ramp over ``warmup_steps``, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, base_lr: float, decay_at: Sequence[int]) -> float:
    """Learning rate after ``step`` rounds/epochs: x0.1 at the first decay point, x0.01 at the second..."""
    return base_lr * 0.1 ** sum(1 for d in decay_at if step >= d)


def _autocast(bf16: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device_type`` ("cpu" or "cuda") when ``bf16``, else nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@dataclass(frozen=True)
class Proximal:
    """FedProx's term mu/2 ||w - w_round||^2 (Li et al., MLSys 2020) around the weights a round
    started from: its gradient mu (w - w_round) joins each parameter's before the optimizer step."""

    mu: float
    anchor: tuple[torch.Tensor, ...]

    @classmethod
    def around(cls, model: nn.Module, mu: float) -> Proximal:
        """The term around ``model``'s weights as they are now."""
        return cls(mu, tuple(p.detach().clone() for p in model.parameters()))

    def add_gradient(self, model: nn.Module) -> None:
        """Add mu (w - w_round) to every parameter's gradient."""
        for p, a in zip(model.parameters(), self.anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=self.mu)


class WeightAverage:
    """An exponential moving average of a model's weights and buffers, updated after every step
    (Polyak averaging, as timm's ModelEmaV2 and many STR recipes do): the averaged weights read
    better than the last ones when the last steps still move. Its decay is ramped over the first
    steps, ``min(decay, (1 + n) / (10 + n))``, so the start weights fade quickly."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward ``model``'s weights as they are now."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            mine = self.state[k]
            if mine.is_floating_point():
                mine.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:  # counters such as BatchNorm's num_batches_tracked
                mine.copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.state)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    bf16: bool = False,
    grad_clip: float = 5.0,
    proximal: Proximal | None = None,
) -> float:
    """One optimizer step of teacher-forced training on a batch already on the model's device.

    The loss is the attention decoder's cross entropy, plus the model's weighted auxiliary CTC
    loss when it has a CTC head (``Recognizer.training_loss``). Returns the loss.

    Raises:
        FloatingPointError: the loss is not finite (nothing is stepped), so a diverged model is
            never uploaded.
    """
    with _autocast(bf16, images.device.type):
        if hasattr(model, "training_loss"):
            loss = model.training_loss(images, targets)
        else:
            loss = sequence_loss(model(images, targets).float(), targets)
    value = loss.item()  # one device sync per step
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if proximal is not None:
        proximal.add_gradient(model)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int = 0,
    bf16: bool = False,
    grad_clip: float = 5.0,
    on_batch: Callable[[int, float], None] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    proximal: Proximal | None = None,
) -> EpochStats:
    """One pass of teacher-forced training (``train_step``) over ``batches`` of (images, targets, labels).

    Batches are copied to ``device`` (None: where the model's parameters are); ``bf16`` autocasts
    there. Each step is reported to ``progress`` (its images and loss) and to ``on_batch(step, loss)``.
    Raises FloatingPointError when the loss stops being finite.
    """
    model.train()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    total, seen = 0.0, 0
    for step, (images, targets, _labels) in enumerate(batches):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        try:
            value = train_step(
                model, images, targets, optimizer, bf16=bf16, grad_clip=grad_clip, proximal=proximal
            )
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} at epoch {epoch} step {step}") from None
        total += value * images.shape[0]
        seen += images.shape[0]
        if on_batch is not None:
            on_batch(step, value)
        if progress is not None:
            progress.update(items=images.shape[0], loss=value)
    seconds = time.perf_counter() - start
    return EpochStats(epoch=epoch, loss=total / max(seen, 1), samples=seen, seconds=seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    *,
    beam_width: int = 5,
    bf16: bool = False,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Word accuracy of ``model.predict`` and mean teacher-forced loss over ``batches``.

    Batches are copied to ``device`` (None: where the model's parameters are); each batch is
    reported to ``progress`` (its images and loss).
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    predictions: list[str] = []
    labels: list[str] = []
    loss_sum, seen = 0.0, 0
    for images, targets, batch_labels in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(bf16, device.type):
            logits = model(images, targets)
            ids = model.predict(images, beam_width=beam_width)
        batch_loss = sequence_loss(logits.float(), targets).item()
        loss_sum += batch_loss * images.shape[0]
        seen += images.shape[0]
        if progress is not None:
            progress.update(items=images.shape[0], loss=batch_loss)
        predictions.extend(model.alphabet.decode(seq) for seq in ids)
        labels.extend(batch_labels)
    return EvalResult(
        accuracy=metrics.word_accuracy(predictions, labels) if labels else 0.0,
        char_accuracy=metrics.char_accuracy(predictions, labels) if labels else 0.0,
        loss=loss_sum / max(seen, 1),
        samples=seen,
        predictions=predictions,
        labels=labels,
    )
