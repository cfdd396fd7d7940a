"""Cryptographic building blocks of secure aggregation: masks, shares, commitments, the neighbour graph.

This follows Bonawitz et al. (CCS 2017), with the sparse neighbour graph of SecAgg+ (Bell et al.,
CCS 2020). One round, as the protocol wiring will run it for edges u, v, ...:

1. Advertise: u makes two X25519 key pairs, ``c_u`` (to seal shares) and ``s_u`` (to agree on
   masks), and publishes both public keys; ``neighbours`` says which edges are paired.
2. Share: u draws a 32-byte self-mask seed ``b_u``, splits ``b_u`` and the private half of ``s_u``
   among its neighbours (``fedocr.shamir.split``), commits to every share (``commit_share``) and
   seals each one for its holder (``seal`` under ``agree(c_u, c_v)``).
3. Upload: u sends ``encode_fixed(x_u) + expand_mask(b_u) + sum_v ±expand_mask(s_uv)`` mod 2^32
   (``mask_upload``), where ``s_uv = agree(s_u, s_v)``; the two masks of a pair have opposite signs.
4. Unmask: for each survivor its neighbours reveal shares of ``b_u``; for each edge that dropped
   before uploading they reveal shares of its ``s_u`` private key. ``fedocr.shamir.combine``
   rebuilds them, ``check_share`` names any bad share, and ``remove_masks`` leaves the sum of
   encoded updates.

What the server learns: the sum over survivors (hence their weighted mean, ``decode_fixed``), who
survived, the graph, the public keys and the sizes of sealed shares. It learns no single update
while the honest survivors stay connected in the graph, fewer than ``threshold`` holders of any
edge's secrets collude with it, and no honest edge reveals both ``b_u`` and ``s_u`` shares of one u.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedocr import pki

DOMAIN = b"fedocr/secagg/v1"  # prefixes every hash, KDF info and aad, so no two uses collide
KEY_BYTES = 32  # X25519 keys, agreed keys, mask seeds and Shamir secrets (fedocr.shamir)
NONCE_BYTES = 12  # ChaCha20-Poly1305
TAG_BYTES = 16
WRAP = 2**31  # an int32 sum must stay below this in magnitude
# A secure round unmasks no fewer uploads than this: with two, each edge would learn the other's
# update from the published model (the mean less its own). The aggregator never closes a secure
# round below it and an edge reveals nothing for fewer survivors.
MIN_SURVIVORS = 3


class SecAggError(ValueError):
    """Base of every secure-aggregation error: bad input, bad key, bad share, bad ciphertext."""


class BadKey(SecAggError):
    """A public key, seed or symmetric key of the wrong length, or a low-order X25519 point."""


class BadCiphertext(SecAggError):
    """A sealed share that fails authentication: tampered, wrong key, or another round/sender/recipient."""


class NotEnoughShares(SecAggError):
    """Fewer shares than the threshold: the secret cannot be rebuilt."""


class BadSignature(SecAggError):
    """An advertisement whose signature or certificate does not check out against the CA."""


class BadShare(SecAggError):
    """A malformed share, shares that rebuild no 32-byte secret, or a share that fails its commitment.

    ``dealer``, ``holder`` and ``round_id`` are set when the culprit is known (``check_share``).
    """

    def __init__(
        self, message: str, dealer: str | None = None, holder: str | None = None, round_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.dealer, self.holder, self.round_id = dealer, holder, round_id


def _frame(*parts: bytes) -> bytes:
    """Length-prefix each part, so that ("ab", "c") and ("a", "bc") never encode alike."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _round(round_id: int) -> bytes:
    if not isinstance(round_id, int) or not 0 <= round_id < 2**64:
        raise SecAggError(f"round id must be an integer in [0, 2**64), got {round_id!r}")
    return round_id.to_bytes(8, "big")


def key_bytes(value: bytes, what: str) -> bytes:
    """``value`` as bytes; BadKey naming ``what`` unless it is KEY_BYTES long."""
    value = bytes(value)
    if len(value) != KEY_BYTES:
        raise BadKey(f"{what} must be {KEY_BYTES} bytes, got {len(value)}")
    return value


# --- key agreement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32 raw bytes that are advertised."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild a pair from its 32 raw private bytes (e.g. as rebuilt by ``fedocr.shamir.combine``)."""
        private = X25519PrivateKey.from_private_bytes(key_bytes(raw, "X25519 private key"))
        return cls(private, private.public_key().public_bytes_raw())

    def private_bytes(self) -> bytes:
        """The 32 raw private bytes, the secret that ``fedocr.shamir.split`` shares."""
        return self.private.private_bytes_raw()


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's randomness."""
    private = X25519PrivateKey.generate()
    return KeyPair(private, private.public_key().public_bytes_raw())


def advertisement_bytes(round_id: int, edge_id: str, cipher_public: bytes, mask_public: bytes) -> bytes:
    """What an edge signs when it advertises its keys: the round, its id and both public keys."""
    head = b"fedocr-secagg-advertise/v1"
    return _frame(head, _round(round_id), edge_id.encode(), cipher_public, mask_public)


def survivors_bytes(round_id: int, survivors: Sequence[str], dropped: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: the round, its survivors and its dropped."""
    head = b"fedocr-secagg-survivors/v1"
    return _frame(head, _round(round_id), _frame(*(e.encode() for e in sorted(survivors))),
                  _frame(*(e.encode() for e in sorted(dropped))))  # fmt: skip


def sign_advertisement(key_pem: bytes, message: bytes) -> bytes:
    """ECDSA (SHA-256) signature of ``message`` with an edge's certificate key (PEM)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("an edge's certificate key must be an elliptic-curve key")
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_advertisement(
    ca: x509.Certificate, cert_der: bytes, edge_id: str, message: bytes, signature: bytes,
    what: str = "advertisement",
) -> None:
    """Check that ``cert_der`` is an edge certificate the federation's CA issued to ``edge_id``, and
    that it signed ``message`` (its ``what``). Raises BadSignature naming the edge otherwise."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        cert.verify_directly_issued_by(ca)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {pki.parse_role_uri(u) for u in uris.get_values_for_type(x509.UniformResourceIdentifier)}
        if names != {(pki.ROLE_EDGE, edge_id)}:
            raise BadSignature(f"the certificate sent for {edge_id!r} names {sorted(n for n in names if n)}")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise BadSignature(f"the certificate of {edge_id!r} holds no elliptic-curve key")
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except BadSignature:
        raise
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise BadSignature(f"the {what} of {edge_id!r} is not signed by its certificate from the "
                           f"federation's CA ({type(exc).__name__}: {exc})") from None


def pair_info(purpose: str, round_id: int, a: str, b: str) -> bytes:
    """HKDF info binding a purpose ("mask", "seal"), the round and the two edge ids, ordered."""
    if a == b:
        raise SecAggError(f"an edge is not paired with itself: {a!r}")
    lo, hi = sorted((a, b))
    return _frame(DOMAIN, purpose.encode(), _round(round_id), lo.encode(), hi.encode())


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared with the holder of ``peer_public``: X25519, then HKDF-SHA256 over ``info``.

    Raises BadKey for a peer key that is not 32 bytes or is a low-order point (the shared secret
    would be all zero and known to anyone).
    """
    peer = X25519PublicKey.from_public_bytes(key_bytes(peer_public, "peer public key"))
    try:
        shared = private.exchange(peer)
    except ValueError as exc:  # OpenSSL refuses an all-zero result
        raise BadKey("peer public key is a low-order point: the shared secret would be all zero") from exc
    if hmac.compare_digest(shared, bytes(KEY_BYTES)):
        raise BadKey("peer public key is a low-order point: the shared secret is all zero")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=bytes(info)).derive(shared)


# --- masks ---------------------------------------------------------------------------------------


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values, little-endian, of the ChaCha20 keystream of a 32-byte seed.

    The nonce is fixed (all zero): every seed is derived for one round and used once.
    """
    seed = key_bytes(seed, "mask seed")
    if not isinstance(length, int) or length < 0:
        raise SecAggError(f"mask length must be a non-negative integer, got {length!r}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def pairwise_mask(seed: bytes, me: str, peer: str, length: int) -> np.ndarray:
    """+expand(s_uv) if ``me < peer`` (string order) else −expand(s_uv), mod 2^32: a pair's sum is 0."""
    if me == peer:
        raise SecAggError(f"an edge is not paired with itself: {me!r}")
    mask = expand_mask(seed, length)
    return mask if me < peer else np.negative(mask)  # two's complement negation of uint32


def _flat_u32(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.uint32 or values.ndim != 1:
        raise SecAggError(f"{what} must be a 1-D uint32 array, got {values.dtype} of shape {values.shape}")
    return values


def mask_upload(
    encoded: np.ndarray, me: str, self_seed: bytes, pair_seeds: Mapping[str, bytes]
) -> np.ndarray:
    """What edge ``me`` uploads: encoded + expand(b_u) + Σ pairwise masks with each neighbour, mod 2^32.

    ``encoded``: uint32, shape (n,). ``pair_seeds`` maps each neighbour's id to s_uv.
    """
    masked = _flat_u32(encoded, "encoded update").copy()
    masked += expand_mask(self_seed, masked.size)  # uint32 arithmetic wraps: mod 2^32
    for peer, seed in pair_seeds.items():
        masked += pairwise_mask(seed, me, peer, masked.size)
    return masked


def remove_masks(
    total: np.ndarray, self_seeds: Iterable[bytes], dangling: Iterable[tuple[str, str, bytes]]
) -> np.ndarray:
    """The sum of survivors' encoded updates, from the sum of their uploads (all uint32, shape (n,)).

    ``self_seeds``: the rebuilt b_u of every survivor. ``dangling``: (survivor, dropped, s_uv) for
    every graph edge between a survivor and an edge that did not upload; its mask did not cancel.
    """
    result = _flat_u32(total, "sum of uploads").copy()
    for seed in self_seeds:
        result -= expand_mask(seed, result.size)
    for survivor, dropped, seed in dangling:
        result -= pairwise_mask(seed, survivor, dropped, result.size)
    return result


# --- fixed-point encoding ------------------------------------------------------------------------


def check_headroom(max_weight_sum: float, clip: float, frac_bits: int) -> None:
    """Raise SecAggError if a sum of encoded uploads could wrap around the int32 range.

    Each upload encodes |w·x·2^f| ≤ w·clip·2^f, plus less than 1 of rounding (½ to nearest, < 1
    stochastic); weights are sample counts (≥ 1), so at most W uploads are summed and
    |sum| < W·(clip·2^f + 1), which must stay below 2^31.
    """
    if not math.isfinite(max_weight_sum) or max_weight_sum <= 0:
        raise SecAggError(f"max weight sum must be positive and finite, got {max_weight_sum!r}")
    if not math.isfinite(clip) or clip <= 0:
        raise SecAggError(f"clip must be positive and finite, got {clip!r}")
    if not isinstance(frac_bits, int) or not 0 <= frac_bits <= 31:
        raise SecAggError(f"frac_bits must be an integer in [0, 31], got {frac_bits!r}")
    per_weight = clip * 2.0**frac_bits + 1.0
    if max_weight_sum * per_weight >= WRAP:
        raise SecAggError(
            f"sums could reach {max_weight_sum * per_weight:.6g} >= 2**31 and wrap: with clip={clip} and "
            f"frac_bits={frac_bits} the weight sum must stay below {WRAP / per_weight:.6g}"
        )


def most_frac_bits(max_weight_sum: float, clip: float) -> int:
    """The most fraction bits (≤ 30) that ``check_headroom`` allows for this weight sum and clip."""
    bits = 0
    while bits < 30 and max_weight_sum * (clip * 2.0 ** (bits + 1) + 1.0) < WRAP:
        bits += 1
    return bits


def encode_fixed(
    values: np.ndarray, weight: float, clip: float, frac_bits: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """clip(x, ±clip)·weight·2^f rounded to an integer, in two's complement mod 2^32.

    ``values``: float32, shape (n,); ``weight``: the edge's sample count (≥ 1). With ``rng`` the
    rounding is stochastic (down or up with the odds that make it unbiased: E[encoded] = the exact
    product, so increments smaller than 2^-f still move the mean); without it, to nearest.
    Returns uint32 (n,).
    """
    if not math.isfinite(weight) or weight < 1:
        raise SecAggError(f"weight is a sample count and must be at least 1, got {weight!r}")
    check_headroom(weight, clip, frac_bits)
    x = np.asarray(values)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise SecAggError(f"values must be a 1-D float array, got {x.dtype} of shape {x.shape}")
    if not np.isfinite(x).all():
        raise SecAggError("values must be finite")
    # float64 throughout: clip stays exactly as given, and x·w·2^f is exact for a float32 x and an
    # integer weight below 2^29 (24 + 29 significant bits fit in 53).
    scaled = np.clip(x.astype(np.float64), -clip, clip) * float(weight) * 2.0**frac_bits
    rounded = np.rint(scaled) if rng is None else np.floor(scaled + rng.random(scaled.shape))
    return rounded.astype(np.int64).astype(np.uint32)  # int64 -> uint32 keeps the low 32 bits


def decode_fixed(total: np.ndarray, total_weight: float, frac_bits: int) -> np.ndarray:
    """The weighted mean Σ w·x / W from the sum of encoded updates: signed int32 / (2^f·W).

    ``total``: uint32 (n,); returns float32 (n,). Precision: each upload is w·x·2^f + e with
    |e| ≤ ½ to nearest or |e| < 1 stochastic (the product is exact, see ``encode_fixed``), and
    without wrap (``check_headroom``) the int32 sum is exact, so the result differs from the weighted
    mean of the clipped values by Σe/(2^f·W): less than n/(2^f·W) for n uploads (≤ 2^-f, as
    W ≥ n; stochastic rounding makes it zero in expectation), plus at most 2^-23·|mean| for the
    division and the float32 rounding.
    """
    total = _flat_u32(total, "sum of encoded updates")
    if not math.isfinite(total_weight) or total_weight <= 0:
        raise SecAggError(f"total weight must be positive and finite, got {total_weight!r}")
    signed = total.view(np.int32).astype(np.float64)
    return (signed / (2.0**frac_bits * float(total_weight))).astype(np.float32)


# --- b-bit codes (compressed masked uploads) ------------------------------------------------------

# Code bits b a plan may set (SecurePlan.bits; 0 = 32-bit fixed point for every value).
CODE_BITS = range(2, 9)


def code_max(bits: int) -> int:
    """The largest code magnitude of ``bits``-bit codes: 2^(b-1) - 1 (codes are symmetric)."""
    if bits not in CODE_BITS:
        raise SecAggError(f"code bits must be in {CODE_BITS.start}..{CODE_BITS.stop - 1}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def masked_width(bits: int, edges: int) -> int:
    """The bits of a masked code (8, 16 or 32): the narrowest width whose signed range holds a sum
    of ``edges`` codes, |sum| <= edges * code_max(bits) < 2^(width - 1), so that no sum wraps.

    For b = 4: 8 bits for up to 18 edges, 16 bits for up to 4,681.
    """
    if not isinstance(edges, int) or edges < 1:
        raise SecAggError(f"edges must be a positive integer, got {edges!r}")
    peak = edges * code_max(bits)
    for width in (8, 16, 32):
        if peak < 2 ** (width - 1):
            return width
    raise SecAggError(f"a sum of {edges} {bits}-bit codes does not fit 32 bits")


def code_weight(samples: float, by_samples: bool, sample_cap: float) -> float:
    """An edge's weight inside its codes: min(samples, cap) / cap by samples, else 1 (at most 1)."""
    if not by_samples:
        return 1.0
    if not math.isfinite(sample_cap) or sample_cap < 1:
        raise SecAggError(f"sample_cap must be at least 1, got {sample_cap!r}")
    return min(float(samples), float(sample_cap)) / float(sample_cap)


# The next round's code range: this multiple of the 99th percentile of the last global increment's
# magnitudes (the rest is clipped and carried by error feedback).
RANGE_OVER_P99 = 1.5


def next_code_range(increment: np.ndarray, previous: float, clip: float) -> float:
    """The code range of the next round from this round's global increment of the parameters:
    RANGE_OVER_P99 × its 99th percentile of |x|, within [clip·2^-20, clip]; ``previous`` when the
    increment is all zero."""
    x = np.abs(np.asarray(increment, dtype=np.float32))
    if not x.size or not x.any():
        return previous
    p99 = float(np.partition(x, int(0.99 * (x.size - 1)))[int(0.99 * (x.size - 1))])
    return float(min(clip, max(clip * 2.0**-20, RANGE_OVER_P99 * p99)))


def encode_codes(
    values: np.ndarray, weight: float, clip: float, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """b-bit codes of clip(x, ±clip)·weight against the step clip / code_max(bits), rounded
    stochastically (unbiased), and the values they stand for (float32, in x's units: code·step /
    weight, what error feedback subtracts). ``weight`` in (0, 1] (``code_weight``).

    Returns (codes as uint32 in two's complement mod 2^32, decoded float32), both shape (n,).
    """
    qmax = code_max(bits)
    if not (math.isfinite(weight) and 0 < weight <= 1):
        raise SecAggError(f"a code weight must be in (0, 1], got {weight!r}")
    if not math.isfinite(clip) or clip <= 0:
        raise SecAggError(f"clip must be positive and finite, got {clip!r}")
    x = np.asarray(values)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise SecAggError(f"values must be a 1-D float array, got {x.dtype} of shape {x.shape}")
    if not np.isfinite(x).all():
        raise SecAggError("values must be finite")
    scaled = np.clip(x.astype(np.float64), -clip, clip) * (weight * qmax / clip)  # within ±qmax
    codes = np.clip(np.floor(scaled + rng.random(scaled.shape)), -qmax, qmax)
    decoded = (codes * (clip / (qmax * weight))).astype(np.float32)
    return codes.astype(np.int64).astype(np.uint32), decoded


def decode_codes(total: np.ndarray, width: int, bits: int, clip: float, code_weights: float) -> np.ndarray:
    """The weighted mean Σ w_u·x_u / Σ w_u, float32 (n,), from the unmasked uint32 sum of codes.

    ``total`` holds the sum mod 2^``width`` in its low bits (its masks were removed mod 2^32);
    ``code_weights`` is Σ code_weight over the uploads in it. Each code is off by less than one
    step of its value, so the mean is off by less than n_uploads · step / Σ code_weight
    (zero in expectation).
    """
    total = _flat_u32(total, "sum of codes")
    if not math.isfinite(code_weights) or code_weights <= 0:
        raise SecAggError(f"the sum of code weights must be positive and finite, got {code_weights!r}")
    if width not in (8, 16, 32):
        raise SecAggError(f"a masked width is 8, 16 or 32 bits, got {width!r}")
    low = (total & np.uint32(2**width - 1)).astype(np.int64)
    signed = np.where(low >= 2 ** (width - 1), low - 2**width, low)  # two's complement of width bits
    return (signed * (clip / (code_max(bits) * code_weights))).astype(np.float32)


# --- hidden weights ------------------------------------------------------------------------------

WEIGHT_TENSOR_ID = 2  # the masked upload's last tensor when weights are hidden (after the statistics)
CODE_WEIGHT_BITS = 20  # fraction bits of a code weight in fixed point
# A round's masked sum keeps this many values after the model's for hidden weights (zero otherwise).
HIDDEN_VALUES = 2


def hidden_count(bits: int, hide_weights: bool) -> int:
    """Values of the hidden-weight tensor an upload ends with: the weight, and with code bits the
    code weight; 0 when the weights travel in clear."""
    return (1 + (bits > 0)) if hide_weights else 0


def hidden_weights(weight: float, code_weight: float | None) -> np.ndarray:
    """The hidden-weight tensor of an upload: its FedAvg weight (an integer sample count, or 1) and,
    with code bits, its code weight (secagg.code_weight) in fixed point. uint32, shape (1,) or (2,)."""
    values = [int(weight)]
    if code_weight is not None:
        values.append(int(round(code_weight * 2**CODE_WEIGHT_BITS)))
    return np.array(values, dtype=np.uint32)


def read_hidden(tail: np.ndarray) -> tuple[float, float]:
    """(Σ weights, Σ code weights) from the unmasked sum's HIDDEN_VALUES last values."""
    total = _flat_u32(tail, "hidden weights")
    return float(total[0]), float(total[1]) / 2**CODE_WEIGHT_BITS


# --- share commitments and sealing ---------------------------------------------------------------


def commit_share(dealer: str, holder: str, round_id: int, share: bytes) -> bytes:
    """SHA-256 commitment to the share ``dealer`` gave ``holder`` in ``round_id``.

    A share (threshold ≥ 2) is a uniform 521-bit value, so its hash hides it without a salt.
    """
    framed = _frame(DOMAIN, b"share-commitment", dealer.encode(), holder.encode(), _round(round_id), share)
    return hashlib.sha256(framed).digest()


def check_share(dealer: str, holder: str, round_id: int, share: bytes, commitment: bytes) -> None:
    """Raise BadShare, naming dealer, holder and round, if a revealed share fails its commitment."""
    if not hmac.compare_digest(commit_share(dealer, holder, round_id, share), bytes(commitment)):
        raise BadShare(
            f"share from {dealer} held by {holder} does not match its commitment for round {round_id}",
            dealer=dealer,
            holder=holder,
            round_id=round_id,
        )


def share_aad(round_id: int, sender: str, recipient: str) -> bytes:
    """Associated data of a sealed share: the round, the sender and the recipient, in that order."""
    return _frame(DOMAIN, b"share-aad", _round(round_id), sender.encode(), recipient.encode())


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 under a 32-byte key; a random 12-byte nonce is prepended."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key_bytes(key, "sealing key")).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """The plaintext of ``seal``; BadCiphertext if it was altered or the key or aad differ."""
    aead = ChaCha20Poly1305(key_bytes(key, "sealing key"))
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise BadCiphertext(f"sealed share is {len(ciphertext)} bytes, shorter than nonce and tag")
    try:
        return aead.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise BadCiphertext(
            "sealed share failed authentication: tampered, or another key, round, sender or recipient"
        ) from exc


# --- the SecAgg+ neighbour graph -----------------------------------------------------------------


def neighbours(edge_ids: Sequence[str], k: int, round_seed: bytes) -> dict[str, frozenset[str]]:
    """A Harary graph: edges shuffled by HMAC-SHA256(round_seed, id), on a ring, k/2 each side.

    Every edge gets exactly k neighbours for an even 2 ≤ k < n − 1; k ≥ n − 1 gives the complete
    graph. Symmetric by construction. ``round_seed``: at least 16 bytes, fresh each round.
    """
    ids = list(edge_ids)
    if len(set(ids)) != len(ids) or not all(isinstance(u, str) and u for u in ids):
        raise SecAggError("edge ids must be distinct non-empty strings")
    if len(round_seed) < 16:
        raise SecAggError(f"round seed must be at least 16 bytes, got {len(round_seed)}")
    n = len(ids)
    if k >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    if k < 2 or k % 2:
        raise SecAggError(f"k must be even and at least 2 (or >= n - 1 = {n - 1}), got {k}")
    ring = sorted(ids, key=lambda u: hmac.new(round_seed, u.encode(), hashlib.sha256).digest())
    half = k // 2
    return {u: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d) for i, u in enumerate(ring)}


def neighbour_count(n: int, dropout: float = 0.1, security_bits: int = 40) -> int:
    """The k this module recommends for n edges: the least even k with C(n,2)·dropout^k ≤ 2^-σ.

    Why: on the shuffled ring, surviving edges split into two components only if two separate
    runs of k/2 consecutive edges all drop. With independent dropouts that has probability at most
    C(n,2)·dropout^k (a union bound over the two runs' starts), so k = ⌈(σ + log2 C(n,2)) /
    log2(1/dropout)⌉ keeps the survivors connected except with probability 2^-σ; it is O(log n),
    as Bell et al. (2020) show suffices. Edges that may collude with the server count as dropped:
    add their fraction to ``dropout``. At least 2 and even; capped at n − 1, the complete graph.
    """
    if not isinstance(n, int) or n < 1:
        raise SecAggError(f"n must be a positive integer, got {n!r}")
    if not 0 <= dropout < 1:
        raise SecAggError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(security_bits, int) or security_bits < 1:
        raise SecAggError(f"security_bits must be a positive integer, got {security_bits!r}")
    if n <= 3:
        return n - 1
    k = 2
    if dropout > 0:
        k = max(k, math.ceil((security_bits + math.log2(n * (n - 1) / 2)) / -math.log2(dropout)))
    return min(k + k % 2, n - 1)
