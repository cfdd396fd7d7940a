"""Block-wise image encryption with a secret image key, and the model transformation that matches it.

After Kiya et al. ("Image and Model Transformation with Secret Key for Vision Transformer", 2022;
"Block-Wise Encryption for Reliable Vision Transformer models", 2023). An image, already resized to
the model's input (so that its P x P blocks are the patch embedding's blocks), is encrypted by

- block scrambling: the blocks change places (one permutation of the block grid);
- pixel shuffling: inside every block, pixels change places (one permutation, the same for all blocks);
- negative-positive transform: chosen values v become 255 - v (one mask over a block's 3·P·P values);
- channel shuffling: the colour channels change places (one permutation of R, G, B).

All four come from the image key (a 32-byte key file, separate from the federation key) and each can
be switched off. In the model's input units (x = v/127.5 - 1) the last three are a signed permutation
of each block's vector, so a patch embedding W reads the encrypted block as W reads the plain one when
its columns are permuted and signed the same way; block scrambling is undone by permuting the rows of
the position table. ``encrypt_model`` makes that model without training: a plain (unhashed) model that
reads only images encrypted with the key, with the logits of the original on the plain images.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recognizer.hashing import INDEX_SUFFIX, is_hashed
from recognizer.keys import derive_seed
from recognizer.model import Recognizer
from recognizer.vit import ViTEncoder

LABEL = "image-encryption/v1"  # the derivation label of every permutation drawn from the image key


@dataclass(frozen=True)
class EncryptionOptions:
    """Which of the four transforms run (all by default)."""

    blocks: bool = True
    pixels: bool = True
    negate: bool = True
    channels: bool = True

    def describe(self) -> str:
        """The transforms that run, comma-separated ("none" when none does)."""
        names = [name for name in ("blocks", "pixels", "negate", "channels") if getattr(self, name)]
        return ",".join(names) or "none"

    @classmethod
    def parse(cls, text: str) -> EncryptionOptions:
        """``blocks,pixels,negate,channels`` (any subset; ``all`` or ``none``) -> options; else ValueError."""
        names = {n.strip() for n in text.split(",") if n.strip()}
        if names == {"all"}:
            return cls()
        if names == {"none"}:
            return cls(False, False, False, False)
        unknown = names - {"blocks", "pixels", "negate", "channels"}
        if unknown or not names:
            raise ValueError(f"encryption transforms {text!r}: name some of blocks, pixels, negate, channels")
        return cls(*(n in names for n in ("blocks", "pixels", "negate", "channels")))


@dataclass(frozen=True)
class BlockCipher:
    """The permutations and signs one image key gives for one block size and grid."""

    patch: int
    grid: tuple[int, int]  # blocks per column and per row
    block_order: np.ndarray  # [L]: the encrypted image's block i is the plain image's block block_order[i]
    value_order: np.ndarray  # [3·P·P]: value k of an encrypted block is value value_order[k] of the plain one
    negated: np.ndarray  # [3·P·P] bool: value k of an encrypted block is negated (v -> 255 - v)

    @classmethod
    def from_key(
        cls, key: bytes, patch: int, grid: tuple[int, int], options: EncryptionOptions = EncryptionOptions()
    ) -> BlockCipher:
        """Draw the permutations for blocks of ``patch`` x ``patch`` in a ``grid`` from the image key."""
        size = patch * patch
        rng = np.random.default_rng(derive_seed(key, f"{LABEL}/{patch}/{grid[0]}x{grid[1]}"))
        blocks, pixels = rng.permutation(grid[0] * grid[1]), rng.permutation(size)
        channels, negated = rng.permutation(3), rng.random(3 * size) < 0.5  # drawn whatever the options
        if not options.blocks:
            blocks = np.arange(grid[0] * grid[1])
        if not options.pixels:
            pixels = np.arange(size)
        if not options.channels:
            channels = np.arange(3)
        if not options.negate:
            negated = np.zeros(3 * size, dtype=bool)
        # Values are laid out (channel, row, column) in a block, as the patch embedding unfolds them.
        value_order = (channels[:, None] * size + pixels[None, :]).reshape(-1)
        return cls(patch, grid, blocks, value_order, negated)

    @classmethod
    def for_model(cls, key: bytes, model: Recognizer, options: EncryptionOptions = EncryptionOptions()):
        """The cipher whose blocks are ``model``'s patches. ValueError unless it has a patch embedding."""
        if not isinstance(model.encoder, ViTEncoder):
            name = model.config.name
            raise ValueError(f"preset {name} has no patch embedding: image encryption needs a vit preset")
        return cls.from_key(key, model.config.vit_patch, model.encoder.grid, options)

    def _blocks(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> [L, 3·P·P] (blocks row-major, values channel, row, column)."""
        p, (gh, gw) = self.patch, self.grid
        if pixels.shape != (gh * p, gw * p, 3):
            raise ValueError(f"the image must be {gh * p}x{gw * p} RGB (the model's input): {pixels.shape}")
        return pixels.reshape(gh, p, gw, p, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 3 * p * p)

    def _image(self, blocks: np.ndarray) -> np.ndarray:
        p, (gh, gw) = self.patch, self.grid
        return blocks.reshape(gh, gw, 3, p, p).transpose(0, 3, 1, 4, 2).reshape(gh * p, gw * p, 3)

    def encrypt(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] at the model's input size -> the encrypted image, same shape and dtype."""
        blocks = self._blocks(np.asarray(pixels, dtype=np.uint8))[self.block_order][:, self.value_order]
        blocks = np.where(self.negated, 255 - blocks, blocks)
        return np.ascontiguousarray(self._image(blocks))

    def decrypt(self, pixels: np.ndarray) -> np.ndarray:
        """The inverse of ``encrypt``."""
        blocks = self._blocks(np.asarray(pixels, dtype=np.uint8))
        blocks = np.where(self.negated, 255 - blocks, blocks)
        plain = np.empty_like(blocks)
        plain[np.ix_(self.block_order, self.value_order)] = blocks
        return np.ascontiguousarray(self._image(plain))


def token_order_of(model: Recognizer) -> list[int] | None:
    """A transformed model's output token order (model-file metadata; None: the identity)."""
    order = getattr(model.encoder, "token_order", None)
    if order is None or torch.equal(order, torch.arange(len(order))):
        return None
    return order.tolist()


def image_key_fingerprint(key: bytes) -> str:
    """A short public name of an image key (recorded in transformed model files; not the key)."""
    return hashlib.sha256(b"fedocr/image-key/" + key).hexdigest()[:16]


def plain_copy(model: Recognizer) -> Recognizer:
    """An unhashed model with ``model``'s effective weights (each hashed weight gathered as R[Idx])."""
    plain = Recognizer(model.config)
    with torch.no_grad():
        for name, target in [*plain.named_parameters(), *plain.named_buffers()]:
            owner, _, attr = name.rpartition(".")
            target.copy_(getattr(model.get_submodule(owner), attr))
    plain.eval()
    return plain


def encrypt_model(
    model: Recognizer, key: bytes, options: EncryptionOptions = EncryptionOptions()
) -> Recognizer:
    """A plain (unhashed) copy of ``model`` that reads images encrypted with ``key`` as ``model`` reads
    the plain ones: the patch embedding's columns permuted and signed, the position table's rows permuted
    and the output tokens read back in the plain order (``token_order``: save it with ``token_order_of``).

    Raises:
        ValueError: the model has no patch embedding.
    """
    cipher = BlockCipher.for_model(key, model, options)
    plain = plain_copy(model)
    encoder: ViTEncoder = plain.encoder  # type: ignore[assignment]
    signs = torch.from_numpy(np.where(cipher.negated, -1.0, 1.0).astype(np.float32))
    with torch.no_grad():
        weight = encoder.patch_embedding.proj.weight
        weight.copy_(weight[:, torch.from_numpy(cipher.value_order)] * signs)
        table = encoder.position.weight
        table.copy_(table[torch.from_numpy(cipher.block_order)])
        encoder.token_order.copy_(torch.from_numpy(np.argsort(cipher.block_order)))
    return plain




def align_model(model: Recognizer, cipher: BlockCipher) -> Recognizer:
    """Make ``model`` read images encrypted with ``cipher`` exactly as it read plain ones, in place,
    without changing a single trained value: a hashed layer's index map (R[Idx]) is permuted instead of
    its weights, so the real vectors, and what an edge uploads, keep their plain meaning.

    The patch embedding's columns (or their index map) follow ``value_order`` and its input is
    multiplied by the negation signs; the position table's rows follow ``block_order``; the output
    tokens are read back in the plain order. Training such a model on encrypted images is, step for
    step, training the plain model on plain ones (up to the order of float sums), which is what lets a
    federation of edges that encrypt their shards learn as fast as on plain images. Call it once,
    on a model built plain.

    Raises:
        ValueError: the model has no patch embedding, its grid is not the cipher's, or it is aligned.
    """
    if not isinstance(model.encoder, ViTEncoder):
        name = model.config.name
        raise ValueError(f"preset {name} has no patch embedding: image encryption needs a vit preset")
    encoder: ViTEncoder = model.encoder
    embedding = encoder.patch_embedding
    if (embedding.patch, encoder.grid) != (cipher.patch, tuple(cipher.grid)):
        raise ValueError(f"the cipher's {cipher.patch}-pixel blocks in a {cipher.grid} grid are not the "
                         f"model's {embedding.patch}-pixel blocks in {encoder.grid}")
    if embedding.signs is not None:
        raise ValueError("the model is aligned to an image key already")
    device = encoder.token_order.device
    values = torch.from_numpy(cipher.value_order).to(device)
    blocks = torch.from_numpy(cipher.block_order).to(device)
    _permute(embedding.proj, "weight", lambda w: w[:, values])
    _permute(encoder.position, "weight", lambda w: w[blocks])
    embedding.signs = torch.from_numpy(np.where(cipher.negated, -1.0, 1.0).astype(np.float32)).to(device)
    encoder.token_order.copy_(torch.from_numpy(np.argsort(cipher.block_order)))
    return model


def _permute(layer: torch.nn.Module, name: str, take: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rearrange weight ``name`` of ``layer`` by ``take``: its index map when hashed, else the weight."""
    with torch.no_grad():
        if is_hashed(layer):
            index = layer.index_map(name)
            layer._buffers[name + INDEX_SUFFIX] = take(index).reshape(-1).contiguous()
            layer._hash_cache = None if layer._hash_cache is None else {}
        else:
            weight = getattr(layer, name)
            weight.copy_(take(weight.detach().clone()))


def cipher_for_preset(
    key: bytes, preset: str, options: EncryptionOptions = EncryptionOptions()
) -> BlockCipher:
    """The cipher for a vit preset's input size and patch, without building the model."""
    from recognizer.model import resolve_preset

    c = resolve_preset(preset)
    if c.encoder != "vit":
        raise ValueError(f"preset {c.name} has no patch embedding: image encryption needs a vit preset")
    h, w = c.tps_output_hw
    return BlockCipher.from_key(key, c.vit_patch, (h // c.vit_patch, w // c.vit_patch), options)


def encrypt_dataset(
    source: Path, out: Path, cipher: BlockCipher, input_hw: tuple[int, int], keep_aspect: bool,
    progress: Callable[[int], None] | None = None,
) -> int:  # fmt: skip
    """Write every sample of the LMDB ``source`` to a new LMDB ``out``, resized as the model reads it and
    encrypted, as lossless PNG (labels and styles unchanged). Returns the sample count.

    Raises:
        DatasetError: ``source`` is unreadable or ``out`` already holds an LMDB.
    """
    from PIL import Image

    from recognizer.dataset import image_to_array
    from recognizer.lmdb_data import LmdbReader, LmdbWriter

    reader = LmdbReader(Path(source))
    with LmdbWriter(Path(out)) as writer:
        for i in range(len(reader)):
            image, label, style = reader.get(i)
            pixels = cipher.encrypt(image_to_array(image, input_hw, keep_aspect))
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            writer.add(buffer.getvalue(), label, style)
            if progress is not None:
                progress(i + 1)
    reader.close()
    return len(reader)


__all__ = ["BlockCipher", "EncryptionOptions", "align_model", "cipher_for_preset", "encrypt_dataset",
           "encrypt_model", "image_key_fingerprint", "plain_copy", "token_order_of"]  # fmt: skip
