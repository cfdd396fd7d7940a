"""The edge's side of secure aggregation: its keys, the shares it deals, holds and reveals, its mask.

Pure Python and numpy over fedocr.secagg, no grpc: edge_agent/secure/protocol.py runs the RPCs
around it. One EdgeSession per round; its secrets live only in memory, so an edge that restarts
mid-round simply drops out of it (which dropout recovery is for).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from fedocr import secagg, shamir

SELF_SEED, MASK_KEY = "self_seed", "mask_key"  # aggregator.secure.record's names of the two secrets


class SecureProtocolError(secagg.SecAggError):
    """The server asked for something this edge must not do (it would weaken its privacy)."""


@dataclass(frozen=True)
class SecureSettings:
    """The plan's secure-aggregation settings (TrainingPlan.secure)."""

    clip: float
    frac_bits: int
    round_seed: bytes
    weight_by_samples: bool
    bits: int = 0  # the parameters' code bits (0: 32-bit fixed point for every value)
    sample_cap: float = 0.0  # with bits and weighting by samples: secagg.code_weight's cap
    code_range: float = 0.0  # with bits: the codes' range (0: the clip)
    hide_weights: bool = False  # the weights travel masked, as the upload's last values
    hide_weights: bool = False  # the weights travel masked, as the upload's last values

    def __post_init__(self) -> None:
        if self.bits and self.bits not in secagg.CODE_BITS:
            raise SecureProtocolError(f"the plan's code bits {self.bits} are not 0 or 2..8")
        if self.bits and self.weight_by_samples and not self.sample_cap >= 1:
            raise SecureProtocolError(f"the plan's sample cap {self.sample_cap} is below 1")
        if self.bits and not 0 <= self.code_range <= self.clip:
            raise SecureProtocolError(f"the plan's code range {self.code_range} is not within [0, clip]")


class EdgeSession:
    """One edge in one secure round: advertise -> deal -> receive -> mask -> reveal."""

    def __init__(self, edge_id: str, round_id: int, settings: SecureSettings) -> None:
        self.edge_id, self.round_id, self.settings = edge_id, round_id, settings
        self.cipher = secagg.generate_keypair()  # c_u: seals shares
        self.mask = secagg.generate_keypair()  # s_u: agrees pairwise masks
        self.self_seed = secrets.token_bytes(secagg.KEY_BYTES)  # b_u
        self.peers: frozenset[str] = frozenset()
        self.mask_keys: dict[str, bytes] = {}  # roster edge -> its mask public key
        self.held: dict[str, tuple[bytes, bytes]] = {self.edge_id: (b"", b"")}  # dealer -> (b, s) share
        self.dealers: frozenset[str] = frozenset()
        self.graph: dict[str, frozenset[str]] = {}  # the round's neighbour graph, from the roster and seed
        self.threshold = 0
        self._revealed: tuple[frozenset[str], frozenset[str], list] | None = None
        self.decoded: np.ndarray | None = None  # with code bits: what the last upload stands for
        # Unbiased (stochastic) rounding of the fixed-point upload, from a fresh OS seed per round.
        self._rounding = np.random.default_rng(secrets.randbits(128))

    def advertisement(self) -> tuple[bytes, bytes]:
        """The two public keys to advertise: (cipher, mask)."""
        return self.cipher.public, self.mask.public

    def deal(
        self, roster: list[tuple[str, int, bytes, bytes]], neighbours: int, threshold: int
    ) -> tuple[dict[str, bytes], dict[str, tuple[bytes, bytes]]]:
        """Split b_u and s_u among this edge and its neighbours; seal each share for its holder.

        ``roster``: (edge id, Shamir x, cipher public, mask public). Returns (sealed shares by
        holder, commitments (b, s) by holder, this edge included).
        """
        ids = [e for e, _, _, _ in roster]
        if self.edge_id not in ids:
            raise SecureProtocolError(f"{self.edge_id} is not in the roster of round {self.round_id}")
        mine = dict(zip(ids, ((c, s) for _, _, c, s in roster), strict=True))
        if mine[self.edge_id] != self.advertisement():
            raise SecureProtocolError("the roster does not carry the keys this edge advertised")
        self.graph = secagg.neighbours(ids, neighbours, self.settings.round_seed)
        self.peers = self.graph[self.edge_id]
        holders = sorted(self.peers | {self.edge_id})
        # A strict majority: a server that shows different survivor lists to disjoint halves of the
        # holders can then never collect both kinds of shares of one edge.
        if not (2 <= threshold <= len(holders) and 2 * threshold > len(holders)):
            raise SecureProtocolError(
                f"threshold {threshold} is not a majority of this edge's {len(holders)} share holders"
            )
        self.threshold = threshold
        xs = {e: x for e, x, _, _ in roster}
        self.mask_keys = {e: s for e, (_, s) in mine.items()}
        b_shares = shamir.split(self.self_seed, threshold, [xs[h] for h in holders])
        s_shares = shamir.split(self.mask.private_bytes(), threshold, [xs[h] for h in holders])
        sealed, commitments = {}, {}
        for h in holders:
            b, s = b_shares[xs[h]], s_shares[xs[h]]
            commitments[h] = (
                secagg.commit_share(self.edge_id, h, self.round_id, b),
                secagg.commit_share(self.edge_id, h, self.round_id, s),
            )
            if h == self.edge_id:
                self.held[h] = (b, s)
                continue
            info = secagg.pair_info("seal", self.round_id, self.edge_id, h)
            key = secagg.agree(self.cipher.private, mine[h][0], info)
            sealed[h] = secagg.seal(key, b + s, secagg.share_aad(self.round_id, self.edge_id, h))
        return sealed, commitments

    def receive(
        self, dealers: list[str], sealed: list[tuple[str, bytes]], cipher_keys: dict[str, bytes]
    ) -> None:
        """Open the shares dealt to this edge; ``dealers``: who dealt (mask only with them).

        Raises secagg.BadCiphertext (a share sealed for another round, sender or recipient).
        """
        self.dealers = frozenset(dealers)
        if self.edge_id not in self.dealers:
            raise SecureProtocolError(f"{self.edge_id}'s shares were not dealt in round {self.round_id}")
        for dealer, ct in sealed:
            if dealer not in self.peers:
                raise SecureProtocolError(f"a share from {dealer}, not a neighbour of {self.edge_id}")
            info = secagg.pair_info("seal", self.round_id, dealer, self.edge_id)
            key = secagg.agree(self.cipher.private, cipher_keys[dealer], info)
            plain = secagg.open_sealed(key, ct, secagg.share_aad(self.round_id, dealer, self.edge_id))
            self.held[dealer] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        live = (self.peers & self.dealers) | {self.edge_id}
        if len(live) < self.threshold:
            # Too few neighbours to mask with or to rebuild this edge's secrets: refuse to upload.
            raise SecureProtocolError(
                f"only {len(live) - 1} of {self.edge_id}'s {len(self.peers)} neighbours dealt; "
                f"{self.threshold} share holders are needed"
            )

    def weight(self, samples: int) -> int:
        """This edge's FedAvg weight: its sample count, or 1 for the uniform mean."""
        return samples if self.settings.weight_by_samples else 1

    def hidden_count(self) -> int:
        """Values of the hidden-weight tensor this edge's upload ends with (0: weights in clear)."""
        return secagg.hidden_count(self.settings.bits, self.settings.hide_weights)

    def width(self) -> int:
        """The bits of one masked parameter value: 32, or with code bits the narrowest width that
        the roster's size allows (secagg.masked_width); after ``deal``."""
        return secagg.masked_width(self.settings.bits, len(self.graph)) if self.settings.bits else 32

    def masked(self, increment: np.ndarray, samples: int, statistics: int = 0) -> np.ndarray:
        """The masked upload: the values' encoding + b_u mask + pairwise masks with live neighbours.

        ``increment``: float32 (n,), the flat increment; its last ``statistics`` values are running
        statistics. Without code bits every value is encode(clip(x)·w) in 32-bit fixed point; with
        them the others are b-bit codes (secagg.encode_codes) masked modulo 2^width, and ``decoded``
        holds the float32 values the codes stand for (the statistics as sent), for error feedback.
        With hidden weights the upload ends with the hidden-weight tensor (secagg.hidden_weights).
        Returns uint32 (n,), or (n + hidden_count(),) with hidden weights.
        """
        s = self.settings
        n = increment.size
        encoded = secagg.encode_fixed(increment, self.weight(samples), s.clip, s.frac_bits, self._rounding)
        cut = n - statistics
        weight = None  # the code weight, with code bits
        if s.bits:
            weight = secagg.code_weight(self.weight(samples), s.weight_by_samples, s.sample_cap)
        if s.bits:
            span = s.code_range or s.clip
            codes, decoded = secagg.encode_codes(increment[:cut], weight, span, s.bits, self._rounding)
            encoded[:cut] = codes
            self.decoded = np.concatenate([decoded, increment[cut:]]).astype(np.float32)
        pair_seeds = {
            v: secagg.agree(self.mask.private, self.mask_keys[v], self._mask_info(v))
            for v in sorted(self.peers & self.dealers)
        }
        if s.hide_weights:  # the weights as the last values, masked like the rest
            encoded = np.concatenate([encoded, secagg.hidden_weights(self.weight(samples), weight)])
        masked = secagg.mask_upload(encoded, self.edge_id, self.self_seed, pair_seeds)
        if self.width() < 32:
            masked[:cut] &= np.uint32(2 ** self.width() - 1)  # the masks' sum cancels mod 2^width too
        return masked

    def _mask_info(self, peer: str) -> bytes:
        return secagg.pair_info("mask", self.round_id, self.edge_id, peer)

    def check_survivors(self, survivors: list[str], dropped: list[str]) -> None:
        """Raise SecureProtocolError unless this edge may reveal shares for these survivors and dropped."""
        alive, gone = frozenset(survivors), frozenset(dropped)
        if alive & gone or self.edge_id not in alive:
            raise SecureProtocolError("survivors and dropped overlap, or this edge is not a survivor")
        if not (alive | gone) <= self.dealers:
            raise SecureProtocolError("survivors or dropped edges that never dealt shares")
        if len(alive) < secagg.MIN_SURVIVORS:
            raise SecureProtocolError(
                f"only {len(alive)} survivor(s), fewer than {secagg.MIN_SURVIVORS}: the published mean would "
                "give each survivor the others' update; this edge reveals nothing"
            )
        if len(alive & (self.peers | {self.edge_id})) < self.threshold:
            raise SecureProtocolError(
                f"fewer than {self.threshold} of {self.edge_id}'s share holders survive: it cannot be "
                "unmasked"
            )
        if not _connected(alive, self.graph):
            # A split graph would let the server unmask each part's sum: a partial sum of few edges.
            raise SecureProtocolError("the survivors' neighbour graph is split; this edge reveals nothing")

    def reveal(self, survivors: list[str], dropped: list[str]) -> list[tuple[str, str, bytes]]:
        """(dealer, kind, share): b_u shares of survivors, s_u shares of the dropped.

        Once per round: asked again with other survivors (to learn both secrets of one edge), it refuses.
        """
        self.check_survivors(survivors, dropped)
        alive, gone = frozenset(survivors), frozenset(dropped)
        if self._revealed is not None:
            if self._revealed[:2] != (alive, gone):
                raise SecureProtocolError(f"{self.edge_id} already revealed shares for other survivors")
            return self._revealed[2]
        out = []
        for dealer, (b, s) in sorted(self.held.items()):
            if dealer in alive:
                out.append((dealer, SELF_SEED, b))
            elif dealer in gone:
                out.append((dealer, MASK_KEY, s))
        self._revealed = (alive, gone, out)
        return out


def _connected(nodes: frozenset[str], graph: dict[str, frozenset[str]]) -> bool:
    """Whether ``nodes`` form one connected part of ``graph`` restricted to them."""
    if not nodes:
        return False
    start = next(iter(nodes))
    seen, todo = {start}, [start]
    while todo:
        for v in graph.get(todo.pop(), frozenset()) & nodes:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == nodes
