"""A small vision transformer encoder (after ViTSTR and PARSeq's encoders) for the `vitstr-*` presets.

Each non-overlapping P x P block of the image is one token: a linear map of its 3·P·P values (the
patch embedding), plus a learned embedding of the block's position; pre-norm transformer blocks
follow. Every weight is an nn.Linear or nn.Embedding, so the hashing trick applies to all of them
(layer norms stay plain, like batch norm).

Because the patch embedding is linear in the block's pixels and the position embedding is a table
row per block, a key-dependent shuffle of pixels within blocks, a sign flip of pixels and a shuffle of
blocks act on the model exactly as a permutation and sign change of the patch embedding's columns and
of the position table's rows (recognizer/image_crypt.py). The decoder that reads these tokens must not
depend on their order (content-only attention), or the transformed model reads its output tokens
back in the plain order (``token_order``) before a head that does (columns, a BiLSTM, CTC).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbedding(nn.Module):
    """[B, 3, H, W] -> [B, L, dim]: each P x P block, flattened in (channel, row, column) order, mapped
    by one linear layer; blocks in row-major order (L = H/P · W/P)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, dim)
        # ±1 per block value in a model aligned to an image key (recognizer/image_crypt.py, align_model):
        # it undoes the negative-positive transform before the projection. None: plain images.
        self.register_buffer("signs", None, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        b, c, h, w = images.shape
        p = self.patch
        if c != 3 or h % p or w % p:
            raise ValueError(f"images must be [B, 3, H, W], H and W multiples of {p}: {tuple(images.shape)}")
        blocks = F.unfold(images, kernel_size=p, stride=p)  # [B, 3·P·P, L]
        if self.signs is not None:
            blocks = blocks * self.signs[:, None]
        return self.proj(blocks.transpose(1, 2))


class TransformerBlock(nn.Module):
    """Pre-norm multi-head self-attention and a GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, d/heads]
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTEncoder(nn.Module):
    """Patch embedding, position embedding and ``depth`` transformer blocks: [B, 3, H, W] -> [B, L, dim]."""

    def __init__(self, input_hw: tuple[int, int], patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        h, w = input_hw
        if h % patch or w % patch:
            raise ValueError(f"input {h}x{w} must be a multiple of the patch size {patch}")
        self.grid = (h // patch, w // patch)
        self.patch_embedding = PatchEmbedding(patch, dim)
        self.position = nn.Embedding(self.grid[0] * self.grid[1], dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim
        # The order the output tokens are read in: the identity, except in a model transformed for
        # scrambled blocks (recognizer/image_crypt.py), where it puts every token back at its block's
        # place, so that heads that depend on the order (columns, a BiLSTM, CTC) read as before.
        self.register_buffer("token_order", torch.arange(self.grid[0] * self.grid[1]), persistent=False)

    def reset_parameters(self) -> None:
        """Truncated-normal linear weights (std 0.02) and zero biases, as ViT; position table N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.position.weight, std=0.02)
        # The patch embedding sees raw pixels: the fan-in scale of a conv stem keeps tokens at unit size.
        proj = self.patch_embedding.proj
        nn.init.trunc_normal_(proj.weight, std=1 / math.sqrt(proj.in_features))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch_embedding(images)
        if tokens.shape[1] != self.position.num_embeddings:
            blocks = self.position.num_embeddings
            raise ValueError(f"images give {tokens.shape[1]} blocks, the model reads {blocks}")
        x = tokens + self.position.weight.unsqueeze(0)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, self.token_order]

    def columns(self, tokens: Tensor) -> Tensor:
        """[B, L, dim] tokens (row-major) -> [B, dim, 1, W/P]: each column of blocks averaged, as a CNN's
        1-high feature map that a BiLSTM reads left to right."""
        b, _, d = tokens.shape
        gh, gw = self.grid
        return tokens.view(b, gh, gw, d).mean(1).transpose(1, 2).unsqueeze(2)
