"""The flat trainable state the wire carries: export, load, keyed packing and the model fingerprint."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from recognizer.hashing import hashed_layers, is_hashed, keyed_permutation
from recognizer.keys import derive

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = "fedocr-fingerprint-v3"  # v2: the alphabet; v3: running statistics packed last


# BN running statistics are exported scaled by this power of two (exactly invertible, and the
# scaling commutes with FedAvg): their increments over a local epoch are about 20x a weight's
# (median 0.36 against 0.02 for fedocr-tiny after 125 Adam steps), and a quantized upload gives
# each block of 256 shuffled values one scale, set by its largest value, so unscaled statistics
# would round the weights of nearly every block to zero.
STAT_SCALE = 2.0**-5


def _state_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of everything exported, in the canonical order.

    Parameters come first in named_parameters order (real vectors of hashed layers, BN affine,
    any other parameter), then persistent floating buffers (BN running statistics). Integer
    buffers (num_batches_tracked) and the non-persistent index maps stay local.
    """
    entries = list(model.named_parameters())
    seen: set[int] = set()
    for qualname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is None or bname in module._non_persistent_buffers_set or not buf.is_floating_point():
                continue
            if id(buf) in seen:
                continue
            seen.add(id(buf))
            entries.append((f"{qualname}.{bname}" if qualname else bname, buf))
    return entries


def export_state(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's exported tensors as 1-D float32 CPU tensors, in canonical order.

    Buffers (BN running statistics) are multiplied by STAT_SCALE; load_state divides them back.
    """
    out = []
    for _, t in _state_entries(model):
        flat = t.detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(-1)
        out.append(flat if isinstance(t, nn.Parameter) else flat.mul_(STAT_SCALE))
    return out


def state_lengths(model: nn.Module) -> list[int]:
    """Element count of each tensor export_state returns, in the same order."""
    return [t.numel() for _, t in _state_entries(model)]


def load_state(model: nn.Module, tensors: Sequence[torch.Tensor | np.ndarray]) -> None:
    """Copy ``tensors`` (the export_state layout; any shape, float) back into ``model`` in place.

    Raises:
        ValueError: the number of tensors or the length of one of them does not match.
    """
    entries = _state_entries(model)
    if len(tensors) != len(entries):
        raise ValueError(f"state has {len(tensors)} tensors, this model expects {len(entries)}")
    sources = [torch.as_tensor(t) for t in tensors]
    # Check everything before copying anything, so a bad state never half-loads.
    for i, ((name, target), src) in enumerate(zip(entries, sources, strict=True)):
        if src.numel() != target.numel():
            raise ValueError(
                f"state tensor {i} of {len(entries)} ({name}): expected {target.numel()} values, "
                f"got {src.numel()}"
            )
    with torch.no_grad():
        for (name, target), src in zip(entries, sources, strict=True):
            target.copy_(src.reshape(target.shape))
            if not isinstance(target, nn.Parameter):  # a buffer: a running statistic
                target.div_(STAT_SCALE)
            if name.endswith("running_var"):
                # A variance below zero (a quantized upload's rounding can push a small one there)
                # would make batch norm divide by the root of a negative number.
                target.clamp_(min=0.0)


@functools.lru_cache(maxsize=4)
def _pack_permutation(key: bytes, n: int, statistics: int = 0) -> np.ndarray:
    # Cached: an edge packs and unpacks the same length every round; argsort of ~10^7 costs seconds.
    head = n - statistics
    perm = keyed_permutation(key, "pack", head)
    if statistics:
        perm = np.concatenate([perm, head + keyed_permutation(key, "pack-statistics", statistics)])
    perm.flags.writeable = False
    return perm


def statistics_length(model: nn.Module) -> int:
    """How many of export_state's values are running statistics (the last ones, after the parameters)."""
    return sum(t.numel() for _, t in _state_entries(model) if not isinstance(t, nn.Parameter))


def pack_state(tensors: Sequence[torch.Tensor | np.ndarray], key: bytes, statistics: int = 0) -> np.ndarray:
    """Concatenate ``tensors`` and shuffle with the keyed permutation: one float32 vector.

    The last ``statistics`` values (statistics_length: the running statistics) are shuffled among
    themselves and stay at the end, so the wire can carry them apart from the parameters (losslessly,
    whatever the upload's encoding). The shuffle is linear, so packed vectors can be subtracted and
    averaged like the tensors.
    """
    parts = [
        t.detach().cpu().numpy().reshape(-1) if isinstance(t, torch.Tensor) else np.asarray(t).reshape(-1)
        for t in tensors
    ]
    flat = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
    if not 0 <= statistics <= flat.size:
        raise ValueError(f"{statistics} statistics in a state of {flat.size} values")
    return flat[_pack_permutation(key, flat.size, statistics)]


def unpack_state(
    vector: np.ndarray, key: bytes, lengths: Sequence[int], statistics: int = 0
) -> list[np.ndarray]:
    """Invert pack_state: the 1-D float32 tensors of ``lengths``. A wrong key gives scrambled values.

    Raises:
        ValueError: ``vector`` is not 1-D or its length is not sum(lengths).
    """
    vector = np.asarray(vector, dtype=np.float32)
    total = int(sum(lengths))
    if vector.ndim != 1 or vector.size != total:
        raise ValueError(f"packed state has shape {vector.shape}, expected ({total},)")
    if not 0 <= statistics <= total:
        raise ValueError(f"{statistics} statistics in a state of {total} values")
    flat = np.empty_like(vector)
    flat[_pack_permutation(key, total, statistics)] = vector
    bounds = np.cumsum([0, *lengths])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def pack_model(model: nn.Module, key: bytes) -> np.ndarray:
    """The model's exported state packed under ``key``, running statistics last (pack_state)."""
    return pack_state(export_state(model), key, statistics_length(model))


def load_packed(model: nn.Module, vector: np.ndarray, key: bytes) -> None:
    """Load a vector made by pack_model (under the same key) into ``model`` in place."""
    load_state(model, unpack_state(vector, key, state_lengths(model), statistics_length(model)))


def _describe(model: nn.Module) -> str:
    """Canonical text of the architecture: alphabet, types, settings, virtual shapes, real lengths, gamma."""
    real = {t.name: t for t in hashed_layers(model)}
    lines = [FINGERPRINT_VERSION]
    alphabet = getattr(model, "alphabet", None)
    if alphabet is not None:
        lines.append(alphabet.describe())
    for qualname, module in model.named_modules():
        lines.append(f"module {qualname}|{type(module).__name__}|{module.extra_repr()}")
        if is_hashed(module):
            lines.append(f"  gamma {module.hash_gamma!r}")
        prefix = f"{qualname}." if qualname else ""
        for pname, param in module.named_parameters(recurse=False):
            lines.append(f"  param {pname} {tuple(param.shape)}")
        for name, t in real.items():
            if name.rpartition(".")[0] == qualname:
                lines.append(f"  hashed {name[len(prefix) :]} {t.shape} real={t.real}")
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                lines.append(f"  buffer {bname} {tuple(buf.shape)} {buf.dtype}")
    return "\n".join(lines)


def fingerprint(model: nn.Module, key: bytes) -> bytes:
    """Keyed HMAC-SHA256 of the architecture and of the packed state; call it on W_0.

    Edges with the same key and preset agree; another key, gamma or architecture disagrees,
    and the aggregator learns nothing from the 32 bytes without the key.
    """
    digest = hashlib.sha256(pack_model(model, key).tobytes()).digest()
    message = _describe(model).encode() + b"\n" + digest
    return hmac.new(derive(key, "fingerprint"), message, hashlib.sha256).digest()
