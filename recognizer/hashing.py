"""The hashing trick (FedOCR Algorithm 3): virtual layer weights gathered from short real vectors."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recognizer.keys import derive_seed
from recognizer.recipe import check_gamma

log = logging.getLogger(__name__)

REAL_SUFFIX = "_real"
INDEX_SUFFIX = "_idx"
# Layers that own no weights worth hashing; the paper leaves batch norm plain.
_PLAIN_OK = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# A module with this attribute set to True keeps its plain weights: the paper hashes "nearly all"
# parameters, and a layer whose initial values carry structure (the TPS head's identity frame)
# would be scrambled by the random index map.
EXEMPT_ATTR = "hash_exempt"


@dataclass(frozen=True)
class HashedTensor:
    """One virtual weight: qualified name, virtual shape, virtual count T and real count."""

    name: str
    shape: tuple[int, ...]
    virtual: int
    real: int


def real_count(virtual: int, gamma: float) -> int:
    """Length of the real vector behind ``virtual`` weights: ceil(gamma * T)."""
    return math.ceil(check_gamma(gamma) * virtual)


def keyed_permutation(key: bytes, label: str, n: int) -> np.ndarray:
    """A permutation of 0..n-1 (int64) seeded from the federation key and ``label``.

    Built from PCG64's raw bit stream rather than Generator.permutation, whose output NumPy
    does not promise to keep across versions; edges must agree bit for bit. Each random word
    carries its index in its low bits, so the words are distinct and a plain value sort (8x
    faster than a stable argsort at 10^7) orders them the same on every machine.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    mask = np.uint64((1 << max(1, (n - 1).bit_length())) - 1)
    words = np.random.PCG64(derive_seed(key, label)).random_raw(n)
    words = (words & ~mask) | np.arange(n, dtype=np.uint64)
    words.sort()
    return (words & mask).astype(np.int64)


def hash_index(perm: np.ndarray, gamma: float) -> np.ndarray:
    """Algorithm 3, line 5: Idx = floor(gamma * RS) for a permutation ``perm`` (int64 in, int64 out)."""
    if gamma == 1.0:
        return perm.copy()
    return np.floor(perm * gamma).astype(np.int64)


class _HashedMixin:
    """Serves each hashed weight name as R[Idx], gathered on access (or once per cached_weights)."""

    def __getattr__(self, name: str):
        specs = self.__dict__.get("_hash_specs")
        if specs is not None and name in specs:
            return self.virtual_weight(name)
        return super().__getattr__(name)

    def virtual_weight(self, name: str) -> torch.Tensor:
        """The virtual weight ``name`` = R[Idx], shaped like the plain layer's weight."""
        real = self._parameters[name + REAL_SUFFIX]
        cache = self.__dict__.get("_hash_cache")
        grad = torch.is_grad_enabled()
        if cache is not None:
            hit = cache.get(name)
            # An optimizer step or load bumps _version: the cached gather would be stale then.
            if hit is not None and hit[0] is real and hit[1] == real._version and hit[2] == grad:
                return hit[3]
        # index_select on the flat R; its backward is the scatter-add of Eq. 3.
        virtual = torch.index_select(real, 0, self._buffers[name + INDEX_SUFFIX]).view(self._hash_specs[name])
        if cache is not None:
            cache[name] = (real, real._version, grad, virtual)
        return virtual

    def index_map(self, name: str) -> torch.Tensor:
        """Idx for weight ``name``, shaped like the virtual weight (int32 or int64)."""
        return self._buffers[name + INDEX_SUFFIX].view(self._hash_specs[name])

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_hash_cache"] = None  # gathered tensors carry autograd history and cannot be copied
        return state


class _HashedRNNMixin(_HashedMixin):
    """For nn.LSTM / nn.GRU: re-gathers the flat weight list that their forward hands to _VF.

    RNNBase caches weight tensors in ``_flat_weights``; parametrizations go stale there, so
    the list is rebuilt from the real vectors at every forward instead.
    """

    def _update_flat_weights(self) -> None:
        self._flat_weights = [getattr(self, n, None) for n in self._flat_weights_names]
        self._flat_weight_refs = [None] * len(self._flat_weights)

    def _init_flat_weights(self) -> None:
        # Called by .to()/_apply; the cuDNN flattening in the base version would copy into
        # gathered tensors and cut them off from R.
        self._update_flat_weights()

    def flatten_parameters(self) -> None:
        """No-op: hashed weights are gathered per forward and cannot live in one cuDNN buffer."""

    def __getstate__(self):
        state = super().__getstate__()
        state["_flat_weights"] = [None] * len(state["_flat_weights_names"])
        return state


class HashedConv2d(_HashedMixin, nn.Conv2d):
    """nn.Conv2d whose weight and bias are hashed."""


class HashedLinear(_HashedMixin, nn.Linear):
    """nn.Linear whose weight and bias are hashed."""


class HashedEmbedding(_HashedMixin, nn.Embedding):
    """nn.Embedding whose table is hashed."""


class HashedGRUCell(_HashedMixin, nn.GRUCell):
    """nn.GRUCell whose weights and biases are hashed."""


class HashedLSTM(_HashedRNNMixin, nn.LSTM):
    """nn.LSTM whose weights and biases are hashed."""


class HashedGRU(_HashedRNNMixin, nn.GRU):
    """nn.GRU whose weights and biases are hashed."""


_HASHED: dict[type, type] = {
    nn.Conv2d: HashedConv2d,
    nn.Linear: HashedLinear,
    nn.Embedding: HashedEmbedding,
    nn.GRUCell: HashedGRUCell,
    nn.LSTM: HashedLSTM,
    nn.GRU: HashedGRU,
}
_BASES = tuple(_HASHED)


def _hashed_class(cls: type) -> type | None:
    """The hashed counterpart of ``cls``; subclasses of a supported layer get one made on demand."""
    if cls in _HASHED:
        return _HASHED[cls]
    for base in _BASES:
        if issubclass(cls, base):
            mixin = _HashedRNNMixin if issubclass(base, nn.RNNBase) else _HashedMixin
            _HASHED[cls] = type(f"Hashed{cls.__name__}", (mixin, cls), {"__module__": __name__})
            return _HASHED[cls]
    return None


def _hash_parameter(module: nn.Module, qualname: str, pname: str, key: bytes, gamma: float) -> tuple:
    """Replace parameter ``pname`` of ``module`` by a real vector and an index map; return its shape."""
    weight = module._parameters[pname]
    total = weight.numel()
    n = real_count(total, gamma)
    perm = keyed_permutation(key, f"idx/{qualname}/{pname}", total)
    idx = hash_index(perm, gamma)
    # R[k] takes W at the lowest-ranked virtual slot mapped to k, so at gamma = 1 R[Idx] == W
    # exactly and at gamma < 1 R keeps W's initial distribution.
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(total)
    rank = np.minimum(np.ceil(np.arange(n) / gamma), total - 1).astype(np.int64)
    with torch.no_grad():
        src = torch.from_numpy(inverse[rank]).to(weight.device)
        real = weight.detach().reshape(-1).index_select(0, src).clone()
    index_dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64  # int32 measured no slower
    del module._parameters[pname]
    module.register_parameter(pname + REAL_SUFFIX, nn.Parameter(real, requires_grad=weight.requires_grad))
    index = torch.from_numpy(idx.astype(index_dtype)).to(weight.device)
    module.register_buffer(pname + INDEX_SUFFIX, index, persistent=False)
    return tuple(weight.shape)


def hash_model(model: nn.Module, key: bytes, gamma: float) -> nn.Module:
    """Hash every Conv2d, Linear, Embedding, GRUCell, LSTM and GRU of ``model`` in place.

    Modules marked with ``hash_exempt = True`` stay plain.

    Call it after the plain (key-seeded) initialization: the real vectors are taken from the
    current weights. Batch norm stays plain. Returns ``model``.

    Raises:
        ValueError: gamma outside (0, 1], a layer already hashed, or an Embedding whose
            max_norm / sparse options cannot work on gathered weights.
    """
    gamma = check_gamma(gamma)
    hashed = 0
    for qualname, module in list(model.named_modules()):
        if isinstance(module, _HashedMixin):
            raise ValueError(f"{qualname or 'model'}: already hashed")
        if getattr(module, EXEMPT_ATTR, False):
            continue
        cls = _hashed_class(type(module))
        if cls is None:
            own = [n for n, p in module.named_parameters(recurse=False)]
            if own and not isinstance(module, _PLAIN_OK):
                log.warning("%s (%s) keeps plain parameters %s", qualname, type(module).__name__, own)
            continue
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(f"{qualname}: Embedding with max_norm or sparse=True cannot be hashed")
        specs = {}
        for pname in [n for n, p in module._parameters.items() if p is not None]:
            specs[pname] = _hash_parameter(module, qualname, pname, key, gamma)
        module.__class__ = cls
        module._hash_specs = specs
        module._hash_cache = None
        module.hash_gamma = gamma
        if isinstance(module, nn.RNNBase):
            module._update_flat_weights()  # drop the references to the plain weights
        hashed += 1
    log.debug("hashed %d layers at gamma=%s", hashed, gamma)
    return model


@contextlib.contextmanager
def cached_weights(model: nn.Module) -> Iterator[None]:
    """Within the block each hashed weight is gathered once and reused (e.g. per decoder step).

    Meant to wrap one forward; its backward may run inside or after the block. A parameter
    changed in place (optimizer step, load) is noticed and gathered again. Nesting is allowed.
    """
    opened = [m for m in model.modules() if isinstance(m, _HashedMixin) and m._hash_cache is None]
    for module in opened:
        module._hash_cache = {}
    try:
        yield
    finally:
        for module in opened:
            module._hash_cache = None


def hashed_layers(model: nn.Module) -> list[HashedTensor]:
    """Every hashed tensor of ``model`` in module order, with its virtual and real counts."""
    out = []
    for qualname, module in model.named_modules():
        if not isinstance(module, _HashedMixin):
            continue
        for pname, shape in module._hash_specs.items():
            out.append(
                HashedTensor(
                    name=f"{qualname}.{pname}" if qualname else pname,
                    shape=shape,
                    virtual=math.prod(shape),
                    real=module._parameters[pname + REAL_SUFFIX].numel(),
                )
            )
    return out


def is_hashed(module: nn.Module) -> bool:
    """Whether ``module`` itself is a hashed layer."""
    return isinstance(module, _HashedMixin)
