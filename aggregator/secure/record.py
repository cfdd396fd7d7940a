"""The server's side of secure aggregation: one round's keys, dealt shares, survivors and unmasking.

Pure Python and numpy over fedocr.secagg; the clock is passed in; no I/O, no grpc. The record is
part of the round record (aggregator/rounds.py) and serialises to JSON with it, so every phase is
as durable as the round. Phases: ADVERTISE (keys) -> SHARE (roster fixed; edges deal sealed shares)
-> UPLOAD (dealers fixed; masked uploads) -> UNMASK (survivors fixed; shares revealed) -> DONE.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from fedocr import encodings, secagg, shamir
from fedocr.errors import MalformedRequest, SecureRefused, WrongPhase
from fedocr.v1 import federation_pb2 as pb

ADVERTISE, SHARE, UPLOAD, UNMASK, DONE = "ADVERTISE", "SHARE", "UPLOAD", "UNMASK", "DONE"
PHASES = (ADVERTISE, SHARE, UPLOAD, UNMASK, DONE)
SELF_SEED, MASK_KEY = "self_seed", "mask_key"  # which secret a share belongs to: b_u or s_u
KINDS = (SELF_SEED, MASK_KEY)
# A sealed share holds the holder's share of b_u then of s_u; its exact size is checked on receipt.
PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES
MAX_SIGNATURE_BYTES = 256  # an ECDSA signature in DER is about 72 bytes
SEALED_BYTES = secagg.NONCE_BYTES + PLAINTEXT_BYTES + secagg.TAG_BYTES


class OutsideClip(secagg.SecAggError):
    """An unmasked mean beyond ±clip: the masked sum holds something no clipped upload can give."""


def threshold_for(holders: int, configured: int) -> int:
    """Shares that rebuild a secret: ``configured``, or a majority of its ``holders`` (0 = rule)."""
    return configured if configured else holders // 2 + 1


def seal_info(round_id: int, a: str, b: str) -> bytes:
    """HKDF info of the key that seals shares between edges ``a`` and ``b``."""
    return secagg.pair_info("seal", round_id, a, b)


def mask_info(round_id: int, a: str, b: str) -> bytes:
    """HKDF info of the pairwise mask seed of edges ``a`` and ``b``."""
    return secagg.pair_info("mask", round_id, a, b)


@dataclass
class SecureRecord:
    """One secure round: settings, phase, keys, commitments, sealed shares and revealed shares.

    Binary values are hex strings (JSON). ``sealed[holder][dealer]`` is the ciphertext a dealer
    left for a holder; ``commitments[dealer][holder]`` the two commitments (b_u, s_u) to its shares;
    ``revealed[kind][dealer][holder]`` a revealed share that matched its commitment.

    Those three are O(n·k) and written once per edge, so they stay out of the round record's JSON
    (``core``): each dealing and each reveal is one blob (``take_blobs``) that the store writes in
    the same transaction as the record, and ``add_blob`` reads back.
    """

    round_id: int
    round_seed: str
    clip: float
    frac_bits: int
    weight_by_samples: bool
    configured_threshold: int = 0
    configured_neighbours: int = 0
    phase: str = ADVERTISE
    phase_deadline: float = 0.0  # when the current phase ends (SHARE, UPLOAD, UNMASK)
    threshold: int = 0  # resolved with the roster
    neighbours: int = 0
    keys: dict[str, list[str]] = field(default_factory=dict)  # edge -> [cipher public, mask public]
    # edge -> [signature, certificate] of its advertisement, relayed for the edges to check
    signed: dict[str, list[str]] = field(default_factory=dict, metadata={"blob": True})
    roster: list[str] = field(default_factory=list)  # sorted; Shamir x of an edge = position + 1
    commitments: dict[str, dict[str, list[str]]] = field(default_factory=dict, metadata={"blob": True})
    sealed: dict[str, dict[str, str]] = field(default_factory=dict, metadata={"blob": True})
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    revealed: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict, metadata={"blob": True})
    revealers: list[str] = field(default_factory=list)
    bits: int = 0  # compressed uploads: the parameters' code bits (0: 32-bit fixed point throughout)
    sample_cap: float = 0.0  # with bits and weighting by samples: secagg.code_weight's cap
    code_weights: float = 0.0  # Σ secagg.code_weight of the uploads in the masked sum
    code_range: float = 0.0  # with bits: the codes' range this round (0: the clip)
    confirmations: dict[str, str] = field(default_factory=dict)  # survivor -> its signed lists (hex)
    hide_weights: bool = False  # weights travel masked, as the upload's last tensor

    def settings_only(self) -> SecureRecord:
        """A copy with the round's settings and phase, every per-edge list and map left empty."""
        empty = {
            f.name: type(v)() for f in fields(self) if isinstance(v := getattr(self, f.name), dict | list)
        }
        return replace(self, **empty)

    @classmethod
    def new(
        cls,
        round_id: int,
        clip: float,
        frac_bits: int,
        by_samples: bool,
        t: int,
        k: int,
        bits: int = 0,
        sample_cap: float = 0.0,
        code_range: float = 0.0,
        hide_weights: bool = False,
    ) -> SecureRecord:
        """A round in ADVERTISE with a fresh 32-byte seed for its neighbour graph."""
        return cls(round_id, secrets.token_bytes(32).hex(), clip, frac_bits, by_samples, t, k,
                   bits=bits, sample_cap=sample_cap, code_range=code_range,
                   hide_weights=hide_weights)  # fmt: skip

    def hidden_count(self) -> int:
        """Values of the hidden-weight tensor an upload ends with (0 when weights are in clear)."""
        return secagg.hidden_count(self.bits, self.hide_weights)

    def upload_encoding(self) -> int:
        """The encoding of this round's masked uploads: 32-bit, or with code bits the narrowest
        width that the roster's size allows (secagg.masked_width); known once the roster is fixed."""
        if not self.bits:
            return pb.ENCODING_MASKED_INT
        width = secagg.masked_width(self.bits, max(1, len(self.roster)))
        return encodings.MASKED_BY_WIDTH[width]

    def check_encoding(self, encoding: int) -> None:
        """Raise MalformedRequest unless ``encoding`` is this round's masked upload encoding."""
        expected = self.upload_encoding()
        if encoding != expected:
            raise MalformedRequest(
                f"round {self.round_id} takes masked uploads as {encodings.name_of(expected)} "
                f"({self.bits or 32}-bit values, {len(self.roster)} edges in the roster), "
                f"not {encodings.name_of(encoding)}"
            )

    def add_code_weight(self, weight: float) -> None:
        """Count one upload's code weight (its FedAvg ``weight``: a sample count, or 1)."""
        if self.bits and not self.hide_weights:
            self.code_weights += secagg.code_weight(weight, self.weight_by_samples, self.sample_cap)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SecureRecord:
        """Inverse of ``core`` (the blobs are added with ``add_blob``)."""
        return cls(**doc)

    def core(self) -> dict[str, Any]:
        """The JSON-ready fields, without the per-edge blobs (no copies: serialise it at once)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("blob")}

    def take_blobs(self) -> list[tuple[str, bytes]]:
        """(name, JSON) of the dealings and reveals recorded since the last call."""
        pending = self.__dict__.pop("_blobs", [])
        return [(name, json.dumps(doc).encode()) for name, doc in pending]

    def _blob(self, name: str, doc: Any) -> None:
        self.__dict__.setdefault("_blobs", []).append((name, doc))

    def drop_blobs(self) -> None:
        """Forget the per-edge blobs (a finished round's record keeps its core only)."""
        self.commitments, self.sealed, self.revealed, self.signed = {}, {}, {}, {}
        self.__dict__.pop("_blobs", None)

    def add_blob(self, name: str, data: bytes) -> None:
        """Read back one blob of ``take_blobs`` ("dealt/<dealer>" or "revealed/<holder>")."""
        kind, _, edge_id = name.partition("/")
        doc = json.loads(data)
        if kind == "dealt":
            for holder, ct in doc["sealed"].items():
                self.sealed.setdefault(holder, {})[edge_id] = ct
            self.commitments[edge_id] = doc["commitments"]
        elif kind == "signed":
            self.signed[edge_id] = doc
        elif kind == "revealed":
            for secret, dealer, share in doc:
                self.revealed.setdefault(secret, {}).setdefault(dealer, {})[edge_id] = share
        else:
            raise ValueError(f"unknown secure-aggregation blob {name!r}")

    # -- the graph -------------------------------------------------------------------------

    def graph(self) -> dict[str, frozenset[str]]:
        """The roster's SecAgg+ neighbour graph (cached; the roster never changes once fixed)."""
        cached = self.__dict__.get("_graph")
        if cached is None or cached[0] != len(self.roster):
            graph = secagg.neighbours(self.roster, self.neighbours, bytes.fromhex(self.round_seed))
            self.__dict__["_graph"] = cached = (len(self.roster), graph)
        return cached[1]

    def index(self, edge_id: str) -> int:
        """The Shamir x coordinate of a roster edge."""
        return self.roster.index(edge_id) + 1

    @property
    def dealers(self) -> list[str]:
        """Roster edges whose shares were dealt: the only ones anyone masks with."""
        return sorted(self.commitments)

    def _expect(self, *phases: str) -> None:
        if self.phase not in phases:
            raise WrongPhase(
                f"round {self.round_id} is in secure phase {self.phase}, not {' or '.join(phases)}"
            )

    # -- ADVERTISE -------------------------------------------------------------------------

    def advertise(
        self,
        edge_id: str,
        cipher_public: bytes,
        mask_public: bytes,
        used: set[str],
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> None:
        """Record an edge's two public keys; ``used``: hex keys of earlier rounds (never reused).
        ``signature`` and ``certificate`` are relayed to the other edges, which check them.

        Raises SecureRefused for a second, different advertisement, a key seen before (in this
        round or an earlier one), equal keys or a key that is not a valid X25519 point.
        """
        pair = [bytes(cipher_public).hex(), bytes(mask_public).hex()]
        if self.keys.get(edge_id) == pair:
            return  # a retried request
        if edge_id in self.keys:
            raise SecureRefused(
                f"edge {edge_id!r} already advertised other keys for round {self.round_id}: a replayed "
                "or changed key is refused"
            )
        self._expect(ADVERTISE)
        for raw in (cipher_public, mask_public):
            if len(raw) != secagg.KEY_BYTES:
                raise SecureRefused(f"edge {edge_id!r}: a public key is {len(raw)} bytes, not 32")
            try:
                secagg.agree(secagg.generate_keypair().private, raw, b"key-check")
            except secagg.BadKey as exc:
                raise SecureRefused(f"edge {edge_id!r}: {exc}") from None
        if pair[0] == pair[1]:
            raise SecureRefused(f"edge {edge_id!r} advertised the same key twice")
        seen = {k: owner for owner, ks in self.keys.items() for k in ks}
        for k in pair:
            if k in used or k in seen:
                where = f"edge {seen[k]!r} of this round" if k in seen else "an earlier round"
                raise SecureRefused(
                    f"edge {edge_id!r} advertised a key already used by {where}: a replayed key is refused"
                )
        self.keys[edge_id] = pair
        if signature or certificate:
            self.signed[edge_id] = [bytes(signature).hex(), bytes(certificate).hex()]
            self._blob(f"signed/{edge_id}", self.signed[edge_id])

    def fix_roster(self, now: float, phase_s: float) -> str:
        """Fix the roster to the edges that advertised; '' or why the round cannot go on."""
        self._expect(ADVERTISE)
        self.roster = sorted(self.keys)
        n = len(self.roster)
        k = self.configured_neighbours or secagg.neighbour_count(n)
        self.neighbours = min(k, n - 1)
        self.threshold = threshold_for(self.neighbours + 1, self.configured_threshold)
        self.phase, self.phase_deadline = SHARE, now + phase_s
        if n < 2 or self.threshold > self.neighbours + 1:
            return (
                f"{n} edge(s) advertised keys: each secret has {self.neighbours + 1} holder(s), fewer "
                f"than the threshold {self.threshold}"
            )
        return ""

    # -- SHARE -----------------------------------------------------------------------------

    def share(
        self, dealer: str, sealed: dict[str, bytes], commitments: dict[str, tuple[bytes, bytes]]
    ) -> None:
        """Record the shares ``dealer`` sealed for its neighbours and its commitments to them.

        Raises SecureRefused unless there is one sealed share per neighbour and one commitment pair
        per holder (neighbours and the dealer), each of the right size; a second, different dealing
        is refused too.
        """
        doc = {h: ct.hex() for h, ct in sealed.items()}
        commits = {h: [b.hex(), s.hex()] for h, (b, s) in commitments.items()}
        if dealer in self.commitments:
            if self.commitments[dealer] == commits and all(
                self.sealed.get(h, {}).get(dealer) == ct for h, ct in doc.items()
            ):
                return  # a retried request
            raise SecureRefused(f"edge {dealer!r} already dealt its shares for round {self.round_id}")
        self._expect(SHARE)
        if dealer not in self.roster:
            raise SecureRefused(f"edge {dealer!r} is not in the roster of round {self.round_id}")
        peers = self.graph()[dealer]
        if set(sealed) != peers:
            raise SecureRefused(
                f"edge {dealer!r} sealed shares for {sorted(sealed)[:5]}, not for its {len(peers)} neighbours"
            )
        if set(commitments) != peers | {dealer}:
            raise SecureRefused(f"edge {dealer!r} must commit to the shares of its neighbours and itself")
        for holder, ct in sealed.items():
            if len(ct) != SEALED_BYTES:
                raise SecureRefused(
                    f"sealed share from {dealer!r} for {holder!r} is {len(ct)} bytes, not {SEALED_BYTES}"
                )
        if any(len(c) != 32 for pair in commitments.values() for c in pair):
            raise SecureRefused(f"edge {dealer!r} sent a commitment that is not 32 bytes")
        for holder, ct in doc.items():
            self.sealed.setdefault(holder, {})[dealer] = ct
        self.commitments[dealer] = commits
        self._blob(f"dealt/{dealer}", {"sealed": doc, "commitments": commits})

    def all_dealt(self) -> bool:
        """True when every roster edge dealt its shares."""
        return len(self.commitments) == len(self.roster)

    def start_upload(self, now: float, phase_s: float) -> str:
        """Fix the dealers; '' or why the round cannot go on."""
        self._expect(SHARE)
        self.phase, self.phase_deadline = UPLOAD, now + phase_s
        # Sealed shares from the roster's non-dealers never exist; shares *to* them stay unused.
        return "" if len(self.commitments) >= 2 else f"only {len(self.commitments)} edge(s) dealt shares"

    def sealed_for(self, holder: str) -> list[tuple[str, bytes]]:
        """(dealer, ciphertext) of every share sealed for ``holder``, from UPLOAD on."""
        if self.phase in (ADVERTISE, SHARE):
            return []
        return [(d, bytes.fromhex(ct)) for d, ct in sorted(self.sealed.get(holder, {}).items())]

    # -- UPLOAD ----------------------------------------------------------------------------

    def takes_join(self, edge_id: str) -> bool:
        """Whether ``edge_id`` may still be handed this round: keys are taken, and not yet its."""
        return self.phase == ADVERTISE and edge_id not in self.keys

    def check_upload(self, edge_id: str) -> None:
        """Raise unless ``edge_id`` may upload its masked increment now."""
        self._expect(UPLOAD)
        if edge_id not in self.commitments:
            raise WrongPhase(
                f"edge {edge_id!r} dealt no shares in round {self.round_id}; it cannot upload in it"
            )

    def check_commit(self, edge_id: str) -> None:
        """Raise WrongPhase unless a streamed upload of ``edge_id`` may still enter the sum.

        Checked again when the stream has been read: once the upload phase ended the survivors are
        fixed, and an upload outside them would enter the sum while its masks are removed as a
        dropped edge's.
        """
        if self.phase != UPLOAD:
            raise WrongPhase(
                f"the upload phase of round {self.round_id} ended while the upload of {edge_id!r} "
                f"streamed (now {self.phase}): the survivors were fixed without it, so it is not counted"
            )
        self.check_upload(edge_id)

    def start_unmask(self, uploaded: set[str], now: float, phase_s: float) -> None:
        """Fix the survivors (dealers that uploaded) and the dropped (dealers that did not)."""
        self._expect(UPLOAD)
        self.survivors = sorted(set(self.dealers) & uploaded)
        self.dropped = sorted(set(self.dealers) - uploaded)
        self.phase, self.phase_deadline = UNMASK, now + phase_s

    # -- UNMASK ----------------------------------------------------------------------------

    def confirm(self, edge_id: str, signature: bytes) -> None:
        """Record a survivor's signature of the survivors and dropped (the first one; a retry's is
        the same). The edges check the signatures; the server only relays them."""
        self._expect(UNMASK)
        if edge_id not in self.survivors:
            raise SecureRefused(f"edge {edge_id!r} is not a survivor of round {self.round_id}")
        if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            raise SecureRefused(f"a survivors' signature of {len(signature)} bytes from {edge_id!r}")
        self.confirmations.setdefault(edge_id, bytes(signature).hex())

    def needed(self) -> dict[tuple[str, str], set[str]]:
        """(kind, dealer) -> the survivors that may reveal a share of it.

        Survivors' self-mask seeds; the mask keys of dropped dealers with a surviving neighbour.
        """
        graph, alive = self.graph(), set(self.survivors)
        out = {(SELF_SEED, u): (graph[u] | {u}) & alive for u in self.survivors}
        for v in self.dropped:
            if graph[v] & alive:
                out[(MASK_KEY, v)] = graph[v] & alive
        return out

    def reveal(self, holder: str, shares: list[tuple[str, str, bytes]]) -> None:
        """Record the shares ``holder`` revealed (dealer, kind, share), each checked first.

        Raises SecureRefused, naming dealer and holder, for a share that fails its commitment (a
        bad share, or one of another round), a share not needed (a mask key of a survivor would
        unmask it) or a holder that is not a survivor. Nothing is recorded unless all pass.
        """
        self._expect(UNMASK)
        if holder not in self.survivors:
            raise SecureRefused(
                f"edge {holder!r} is not a survivor of round {self.round_id}; it reveals nothing"
            )
        if holder in self.revealers:
            return  # a retried request; the first one was recorded whole
        needed = self.needed()
        checked = []
        for dealer, kind, share in shares:
            if kind not in KINDS or holder not in needed.get((kind, dealer), ()):
                raise SecureRefused(
                    f"edge {holder!r} may not reveal a {kind} share of {dealer!r} in round {self.round_id}"
                )
            commitment = bytes.fromhex(self.commitments[dealer][holder][KINDS.index(kind)])
            try:
                secagg.check_share(dealer, holder, self.round_id, share, commitment)
            except secagg.BadShare as exc:
                raise SecureRefused(f"bad {kind} share refused: {exc}") from None
            checked.append((kind, dealer, share.hex()))
        for kind, dealer, share in checked:
            self.revealed.setdefault(kind, {}).setdefault(dealer, {})[holder] = share
        self.revealers.append(holder)
        self._blob(f"revealed/{holder}", checked)

    def missing(self) -> list[str]:
        """The secrets that still lack ``threshold`` shares, described for a person."""
        out = []
        for (kind, dealer), holders in sorted(self.needed().items()):
            have = len(self.revealed.get(kind, {}).get(dealer, {}))
            if have < self.threshold:
                out.append(f"{kind} of {dealer} ({have}/{self.threshold}, {len(holders)} holder(s) alive)")
        return out

    def unmask(self, masked_sum: np.ndarray) -> np.ndarray:
        """The sum of survivors' encoded increments from the sum of their masked uploads.

        ``masked_sum``: uint32 (n,); returns uint32 (n,). Raises secagg.SecAggError when the shares
        do not rebuild a consistent secret (a dropped edge's mask key must match its public key).
        """
        graph, alive = self.graph(), set(self.survivors)

        def rebuilt(kind: str, dealer: str) -> bytes:
            shares = self.revealed.get(kind, {}).get(dealer, {})
            points = {self.index(h): bytes.fromhex(s) for h, s in shares.items()}
            return shamir.combine(points, self.threshold)

        self_seeds = [rebuilt(SELF_SEED, u) for u in self.survivors]
        dangling = []
        for v in self.dropped:
            peers = graph[v] & alive
            if not peers:
                continue
            pair = secagg.KeyPair.from_private_bytes(rebuilt(MASK_KEY, v))
            if pair.public.hex() != self.keys[v][1]:
                raise secagg.BadShare(f"the rebuilt mask key of {v} does not match the key it advertised")
            for u in sorted(peers):
                peer = bytes.fromhex(self.keys[u][1])
                dangling.append((u, v, secagg.agree(pair.private, peer, mask_info(self.round_id, u, v))))
        return secagg.remove_masks(masked_sum, self_seeds, dangling)

    def decode(
        self, encoded_sum: np.ndarray, total_weight: float, exact: np.ndarray | None = None
    ) -> np.ndarray:
        """The weighted mean increment, float32 (n,), from the unmasked sum.

        ``exact``: a bool mask (n,) of the values sent in 32-bit fixed point whatever the code bits
        (the running statistics); with code bits the others are codes (secagg.decode_codes).
        Raises OutsideClip when a value lies beyond ±clip by more than the quantization step (and
        float32 rounding; secagg.decode_fixed): a mean of clipped uploads never does, so such a
        sum holds something else (an upload whose masks were removed as a dropped edge's).
        """
        if self.hide_weights:  # the sums of the weights are the masked sum's last values
            n = encoded_sum.size - secagg.HIDDEN_VALUES
            total_weight, code_weights = secagg.read_hidden(encoded_sum[n:])
            if total_weight <= 0 or (self.bits and code_weights <= 0):
                raise OutsideClip(
                    f"the unmasked weights sum to {total_weight:g} and {code_weights:g}: the sum is corrupt"
                )
            self.code_weights, encoded_sum = code_weights, encoded_sum[:n]
        mean = secagg.decode_fixed(encoded_sum, total_weight, self.frac_bits)
        bound = np.full(mean.shape, self.clip * (1 + 2.0**-22) + 2.0**-self.frac_bits)
        if self.bits:
            codes = np.ones(mean.shape, dtype=bool) if exact is None else ~exact
            width = secagg.masked_width(self.bits, max(1, len(self.roster)))
            span = self.code_range or self.clip
            mean[codes] = secagg.decode_codes(encoded_sum[codes], width, self.bits, span, self.code_weights)
            # Each code is within one step of its value: the mean within uploads · step / Σ weights.
            step = span / secagg.code_max(self.bits)
            bound[codes] = span * (1 + 2.0**-22) + len(self.survivors) * step / self.code_weights
        excess = np.abs(mean) - bound
        worst = int(excess.argmax()) if mean.size else 0
        if mean.size and excess[worst] > 0:
            raise OutsideClip(
                f"the unmasked mean reaches |x| = {abs(float(mean[worst])):g} at element {worst}, beyond "
                f"the clip {self.clip:g}: the masked sum is corrupt and is not applied"
            )
        return mean
