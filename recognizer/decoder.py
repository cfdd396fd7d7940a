"""ASTER's attentional GRU decoder: teacher-forced training, greedy and beam-search decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recognizer.charset import EOS, NUM_CLASSES, PAD, START


class AttentionDecoder(nn.Module):
    """Bahdanau-style attention over the encoder sequence driving a GRU cell (aster.pytorch's DecoderUnit).

    At each step the previous state attends over the sequence; the GRU reads the context together with
    the previous symbol's embedding; the new state is classified into NUM_CLASSES.
    """

    def __init__(self, in_dim: int, hidden: int, attention: int, embedding: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.s_embed = nn.Linear(hidden, attention)
        self.x_embed = nn.Linear(in_dim, attention)
        self.w_embed = nn.Linear(attention, 1)
        # One more row than classes: START is an input symbol only.
        self.embedding = nn.Embedding(NUM_CLASSES + 1, embedding)
        self.gru = nn.GRUCell(embedding + in_dim, hidden)
        self.fc = nn.Linear(hidden, NUM_CLASSES)

    def reset_parameters(self) -> None:
        """aster.pytorch's init: small normal attention and classifier weights, zero biases."""
        for m in (self.s_embed, self.x_embed, self.w_embed, self.fc):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        self.embedding.reset_parameters()
        self.gru.reset_parameters()

    def _step(self, feats: Tensor, feats_proj: Tensor, state: Tensor, emb: Tensor) -> Tensor:
        """One decoder step.

        feats [N, L, D], feats_proj [N, L, A] (x_embed of feats), state [N, H], emb [N, E]. Returns [N, H].
        """
        scores = self.w_embed(torch.tanh(feats_proj + self.s_embed(state).unsqueeze(1))).squeeze(2)  # [N, L]
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # [N, D]
        return self.gru(torch.cat([emb, context], 1), state)

    def forward(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced logits.

        feats: [B, L, D] float, the encoded sequence. targets: [B, T] long (ids, EOS, then PAD).
        Returns [B, T, NUM_CLASSES] float; step t is predicted from START, targets[:, :t].
        """
        b, t = targets.shape
        prev = torch.cat([targets.new_full((b, 1), START), targets[:, :-1]], 1)  # [B, T]
        emb = self.embedding(prev)  # [B, T, E]
        # The sequence projection does not depend on the step: compute it once per forward.
        feats_proj = self.x_embed(feats)
        state = feats.new_zeros(b, self.hidden)
        states = []
        for i in range(t):
            state = self._step(feats, feats_proj, state, emb[:, i])
            states.append(state)
        return self.fc(torch.stack(states, 1))  # [B, T, H] -> [B, T, C]

    def decode(self, feats: Tensor, beam_width: int, max_len: int) -> list[list[int]]:
        """Beam search (ASTER: width 5; width 1 is greedy) without length normalization.

        feats: [B, L, D] float. Returns class ids per image, cut before the first EOS. PAD is never
        emitted: it is a padding label, not a prediction.
        """
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        b, n_seq, d = feats.shape
        k = beam_width
        feats_proj = self.x_embed(feats)
        feats = feats.repeat_interleave(k, 0)  # [B*K, L, D]
        feats_proj = feats_proj.repeat_interleave(k, 0)
        state = feats.new_zeros(b * k, self.hidden)
        prev = torch.full((b * k,), START, dtype=torch.long, device=feats.device)
        # Only beam 0 is live at the start, so the first top-k does not pick K copies of one symbol.
        scores = feats.new_full((b, k), float("-inf"), dtype=torch.float32)
        scores[:, 0] = 0.0
        finished = torch.zeros(b, k, dtype=torch.bool, device=feats.device)
        tokens = torch.zeros(b, k, 0, dtype=torch.long, device=feats.device)
        # A finished beam may only be extended by EOS, at no cost.
        eos_only = torch.full((NUM_CLASSES,), float("-inf"), device=feats.device)
        eos_only[EOS] = 0.0
        for step in range(max_len):
            state = self._step(feats, feats_proj, state, self.embedding(prev))
            logp = F.log_softmax(self.fc(state).float(), dim=1).view(b, k, NUM_CLASSES)
            logp[..., PAD] = float("-inf")
            logp = torch.where(finished.unsqueeze(2), eos_only, logp)
            flat = (scores.unsqueeze(2) + logp).view(b, k * NUM_CLASSES)
            scores, idx = flat.topk(k, dim=1)  # [B, K]
            src = idx // NUM_CLASSES
            sym = idx % NUM_CLASSES
            tokens = torch.cat([tokens.gather(1, src.unsqueeze(2).expand(-1, -1, step)), sym.unsqueeze(2)], 2)
            finished = finished.gather(1, src) | (sym == EOS)
            rows = (src + torch.arange(b, device=feats.device).unsqueeze(1) * k).view(-1)  # [B*K]
            state = state[rows]
            prev = sym.view(-1)
            if bool(finished.all()):
                break
        best = tokens[torch.arange(b), scores.argmax(1)].tolist()
        out = []
        for seq in best:
            out.append(seq[: seq.index(EOS)] if EOS in seq else seq)
        return out
