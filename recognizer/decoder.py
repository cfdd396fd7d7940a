"""ASTER's attentional GRU decoder: teacher-forced training, greedy and beam-search decoding."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recognizer.charset import EOS, PAD


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy over non-PAD positions; EOS is a target like any character (ASTER).

    logits: [B, T, C] float; targets: [B, T] long (ids, EOS, then PAD).
    """
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)


class _StepWeights(NamedTuple):
    """The decoder step's weights for one forward (see AttentionDecoder._weights)."""

    emb: Tensor  # [3H, E]
    emb_bias: Tensor  # [3H]
    ctx: Tensor  # [3H, D]
    state: Tensor  # [A + 3H, H]
    state_bias: Tensor  # [A + 3H]
    score: Tensor  # [1, A]
    score_bias: Tensor  # [1]
    location: Tensor | None  # [A, 1, 1, K]: filters over the previous step's attention, or None


class AttentionDecoder(nn.Module):
    """Bahdanau-style attention over the encoder sequence driving a GRU cell (aster.pytorch's DecoderUnit).

    At each step the previous state attends over the sequence; the GRU reads the context together with
    the previous symbol's embedding; the new state is classified into ``num_classes`` (the
    alphabet's symbols plus EOS and PAD).
    """

    def __init__(
        self, in_dim: int, hidden: int, attention: int, embedding: int, num_classes: int, location: int = 0
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.num_classes = num_classes
        self.start = num_classes  # the start symbol: an input row past the output classes
        self.s_embed = nn.Linear(hidden, attention)
        self.x_embed = nn.Linear(in_dim, attention)
        self.w_embed = nn.Linear(attention, 1)
        # One more row than classes: the start symbol is an input only.
        self.embedding = nn.Embedding(num_classes + 1, embedding)
        self.gru = nn.GRUCell(embedding + in_dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        # Location-aware attention (Chorowski et al. 2015) when ``location`` > 0: ``location``-wide
        # filters over the previous step's attention weights feed the scores, so "move one character
        # to the right" is a pattern the decoder can learn directly; step 0 starts at the left edge.
        self.location: nn.Conv2d | None = None
        if location:
            if location % 2 == 0:
                raise ValueError(f"the location filter width must be odd, got {location}")
            self.location = nn.Conv2d(1, attention, (1, location), padding=(0, location // 2), bias=False)

    def reset_parameters(self) -> None:
        """PyTorch's default init for every layer.

        aster.pytorch draws the attention and classifier weights from N(0, 0.01); with scores that
        small the attention stays uniform for a long plateau, which short CPU runs cannot afford.
        """
        for m in (self.s_embed, self.x_embed, self.w_embed, self.fc, self.embedding, self.gru, self.location):
            if m is not None:
                m.reset_parameters()

    def _weights(self) -> _StepWeights:
        """This forward's step weights, gathered once (hashed layers) and cast once (autocast).

        The state feeds both the next attention query and the GRU's hidden gates, so s_embed and
        the GRU's hidden weights are stacked into one matmul per step; the embedding half of the
        GRU's input weights is split off so teacher forcing projects all steps in one matmul.
        """
        e = self.embedding.embedding_dim
        w_ih = self.gru.weight_ih  # [3H, E + D]
        weights = _StepWeights(
            emb=w_ih[:, :e],
            emb_bias=self.gru.bias_ih,
            ctx=w_ih[:, e:],
            state=torch.cat([self.s_embed.weight, self.gru.weight_hh], 0),  # [A + 3H, H]
            state_bias=torch.cat([self.s_embed.bias, self.gru.bias_hh], 0),
            score=self.w_embed.weight,
            score_bias=self.w_embed.bias,
            location=None if self.location is None else self.location.weight,
        )
        device = w_ih.device.type
        if torch.is_autocast_enabled(device):
            # Autocast caches its casts of leaf parameters only; gathered (hashed) weights would be
            # cast again at every step.
            dtype = torch.get_autocast_dtype(device)
            weights = _StepWeights(*(None if w is None else w.to(dtype) for w in weights))
        return weights

    def _first_alpha(self, feats: Tensor) -> Tensor:
        """The "previous" attention of step 0: all weight on the leftmost position. [N, L]."""
        alpha = feats.new_zeros(feats.shape[0], feats.shape[1])
        alpha[:, 0] = 1.0
        return alpha

    def _step(
        self,
        w: _StepWeights,
        feats: Tensor,
        feats_proj: Tensor,
        state: Tensor,
        emb_proj: Tensor,
        prev_alpha: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One decoder step: attend with the previous state, then a GRU cell update (nn.GRUCell's maths).

        feats [N, L, D], feats_proj [N, L, A] (x_embed of feats), state [N, H],
        emb_proj [N, 3H] (the previous symbol's embedding through the GRU's input weights),
        prev_alpha [N, L] (the previous step's attention; read only by location-aware attention).
        Returns the new state [N, H] and this step's attention [N, L].
        """
        h = self.hidden
        query, gh = F.linear(state, w.state, w.state_bias).split([w.state.shape[0] - 3 * h, 3 * h], 1)
        energy = feats_proj + query.unsqueeze(1)  # [N, L, A]
        if w.location is not None:
            loc = F.conv2d(prev_alpha[:, None, None, :].to(w.location.dtype), w.location,
                           padding=(0, w.location.shape[-1] // 2))  # [N, A, 1, L]
            energy = energy + loc.squeeze(2).transpose(1, 2)
        scores = F.linear(torch.tanh(energy), w.score, w.score_bias)  # [N, L, 1]
        alpha = torch.softmax(scores.squeeze(2), dim=1)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # [N, D]
        gi = torch.addmm(emb_proj, context, w.ctx.t())  # [N, 3H]
        gi_rz, gi_n = gi.split([2 * h, h], 1)
        gh_rz, gh_n = gh.split([2 * h, h], 1)
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, 1)
        n = torch.tanh(gi_n + r * gh_n)
        return n + z * (state - n), alpha  # (1 - z) * n + z * state

    def forward(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced logits.

        feats: [B, L, D] float, the encoded sequence. targets: [B, T] long (ids, EOS, then PAD).
        Returns [B, T, num_classes] float; step t is predicted from the start symbol, targets[:, :t].
        """
        b, t = targets.shape
        w = self._weights()
        prev = torch.cat([targets.new_full((b, 1), self.start), targets[:, :-1]], 1)  # [B, T]
        emb_proj = F.linear(self.embedding(prev), w.emb, w.emb_bias)  # [B, T, 3H]
        # The sequence projection does not depend on the step: compute it once per forward.
        feats_proj = self.x_embed(feats)
        state = feats.new_zeros(b, self.hidden)
        alpha = self._first_alpha(feats)
        states = []
        for i in range(t):
            state, alpha = self._step(w, feats, feats_proj, state, emb_proj[:, i], alpha)
            states.append(state)
        return self.fc(torch.stack(states, 1))  # [B, T, H] -> [B, T, C]

    def decode(self, feats: Tensor, beam_width: int, max_len: int) -> list[list[int]]:
        """Beam search (ASTER: width 5; width 1 is greedy) without length normalization.

        feats: [B, L, D] float. Returns class ids per image, cut before the first EOS. PAD is never
        emitted: it is a padding label, not a prediction.
        """
        return self.decode_scored(feats, beam_width, max_len)[0]

    def decode_scored(
        self, feats: Tensor, beam_width: int, max_len: int
    ) -> tuple[list[list[int]], list[float]]:
        """``decode`` and, per image, the log-probability of the sequence it returns (EOS included)."""
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        b = feats.shape[0]
        k = beam_width
        w = self._weights()
        feats_proj = self.x_embed(feats)
        feats = feats.repeat_interleave(k, 0)  # [B*K, L, D]
        feats_proj = feats_proj.repeat_interleave(k, 0)
        state = feats.new_zeros(b * k, self.hidden)
        alpha = self._first_alpha(feats)
        prev = torch.full((b * k,), self.start, dtype=torch.long, device=feats.device)
        # Only beam 0 is live at the start, so the first top-k does not pick K copies of one symbol.
        scores = feats.new_full((b, k), float("-inf"), dtype=torch.float32)
        scores[:, 0] = 0.0
        finished = torch.zeros(b, k, dtype=torch.bool, device=feats.device)
        tokens = torch.zeros(b, k, 0, dtype=torch.long, device=feats.device)
        # A finished beam may only be extended by EOS, at no cost.
        c = self.num_classes
        eos_only = torch.full((c,), float("-inf"), device=feats.device)
        eos_only[EOS] = 0.0
        for step in range(max_len):
            emb_proj = F.linear(self.embedding(prev), w.emb, w.emb_bias)
            state, alpha = self._step(w, feats, feats_proj, state, emb_proj, alpha)
            logp = F.log_softmax(self.fc(state).float(), dim=1).view(b, k, c)
            logp[..., PAD] = float("-inf")
            logp = torch.where(finished.unsqueeze(2), eos_only, logp)
            flat = (scores.unsqueeze(2) + logp).view(b, k * c)
            scores, idx = flat.topk(k, dim=1)  # [B, K]
            src = idx // c
            sym = idx % c
            tokens = torch.cat([tokens.gather(1, src.unsqueeze(2).expand(-1, -1, step)), sym.unsqueeze(2)], 2)
            finished = finished.gather(1, src) | (sym == EOS)
            rows = (src + torch.arange(b, device=feats.device).unsqueeze(1) * k).view(-1)  # [B*K]
            state, alpha = state[rows], alpha[rows]
            prev = sym.view(-1)
            if bool(finished.all()):
                break
        top = scores.argmax(1)
        best = tokens[torch.arange(b), top].tolist()
        out = []
        for seq in best:
            out.append(seq[: seq.index(EOS)] if EOS in seq else seq)
        return out, scores[torch.arange(b), top].tolist()
