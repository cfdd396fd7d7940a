"""Secure aggregation driven in-process: n simulated edges (fedocr.secagg) through the RoundCoordinator.

No gRPC: the RoundCoordinator and its SecureRounds with a fake clock and a real LMDB store, edges as
edge_agent.secure.session.EdgeSession. Precision: the unmasked mean differs from FedAvg of the clipped
increments by at most n·½/(2^f·W) + 2^-23·|mean| (secagg.decode_fixed), stated per check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.rounds import Bytes
from aggregator.secure import DONE, MASK_KEY, UNMASK, UPLOAD
from aggregator.store import KEY_MASKED_SUM, Manifest, Store
from edge_agent.secure.session import EdgeSession, SecureSettings
from fedocr import encodings, errors, secagg, tensors
from fedocr.v1 import federation_pb2 as pb

LENGTHS = (700, 300)  # the second tensor is the exact one (running statistics): masked too
MANIFEST = Manifest(((0, LENGTHS[0], False), (1, LENGTHS[1], True)), b"\x11" * 32)
N = sum(LENGTHS)


class Sim:
    """A federation in-process: config, store, fake clock, and simulated edges."""

    def __init__(self, state_dir: Path, n: int, **overrides) -> None:
        self.dir = state_dir
        values = dict(
            state_dir=state_dir, quorum=n, min_edges=2, deadline_s=100.0, total_rounds=3,
            secure_aggregation=True, secagg_phase_s=10.0,
        )
        values.update(overrides)
        self.config = AggregatorConfig(**values)
        self.now = 1000.0
        self.store = Store(state_dir)
        self.fed = RoundCoordinator(self.config, self.store, clock=lambda: self.now)
        self.ids = [f"edge-{k}" for k in range(n)]
        rng = np.random.default_rng(n)
        self.increments = {e: rng.uniform(-1.5, 1.5, N).astype(np.float32) for e in self.ids}
        self.samples = {e: int(rng.integers(50, 5000)) for e in self.ids}
        self.sessions: dict[str, EdgeSession] = {}

    def restart(self) -> None:
        """Kill the aggregator (drop it, close the store) and start it again on the same state."""
        self.store.close()
        self.store = Store(self.dir)
        self.fed = RoundCoordinator(self.config, self.store, clock=lambda: self.now)

    def tick(self, advance: float = 0.0) -> None:
        self.now += advance
        with self.fed._cond:
            self.fed._tick()

    @property
    def round(self):
        return self.fed.round_status()

    def join_and_advertise(self, edges: list[str]) -> None:
        for e in edges:
            result = self.fed.join(e, MANIFEST, 0)
            assert result.action == "TRAIN"
            sec = result.round.secure
            seed = bytes.fromhex(sec.round_seed)
            settings = SecureSettings(
                sec.clip, sec.frac_bits, seed, sec.weight_by_samples, sec.bits, sec.sample_cap,
                sec.code_range, sec.hide_weights,
            )
            self.sessions[e] = EdgeSession(e, result.round.round_id, settings)
            self.fed.secure.advertise(e, result.round.round_id, *self.sessions[e].advertisement(), Bytes())
        self.tick()

    def whole_round(self, edges: list[str]) -> None:
        """Every phase with ``edges`` and none dropping: joined to unmasked."""
        self.join_and_advertise(edges)
        self.deal(edges)
        self.upload(edges)
        self.tick()
        self.reveal(edges)
        self.tick()

    def deal(self, edges: list[str]) -> None:
        for e in edges:
            s = self.sessions[e]
            view = self.fed.secure.secure_round(e, s.round_id, "ADVERTISE", 0)
            sealed, commits = s.deal([k[:4] for k in view.roster], view.neighbours, view.threshold)
            self.cipher_keys = {k[0]: k[2] for k in view.roster}
            self.fed.secure.share(e, s.round_id, sealed, commits, Bytes())
        self.tick()

    def upload(self, edges: list[str]) -> None:
        for e in edges:
            s = self.sessions[e]
            view = self.fed.secure.secure_round(e, s.round_id, "SHARE", 0)
            assert view.phase == UPLOAD
            s.receive(view.dealers, view.sealed, self.cipher_keys)
            masked = s.masked(self.increments[e], self.samples[e], LENGTHS[1])
            encoding = encodings.MASKED_BY_WIDTH[s.width()]
            hidden = s.hidden_count()  # hidden weights: the header declares none
            stream = masked_stream(s.round_id, masked, 0 if hidden else self.samples[e], encoding, hidden)
            self.fed.upload(e, iter(stream))
            self.check_no_unmasked_vector()

    def reveal(self, edges: list[str]) -> None:
        for e in edges:
            s = self.sessions[e]
            view = self.fed.secure.secure_round(e, s.round_id, "UPLOAD", 0)
            if view.phase == DONE:  # closed as soon as every secret had threshold shares
                return
            assert view.phase == UNMASK
            self.fed.secure.reveal(e, s.round_id, s.reveal(view.survivors, view.dropped), Bytes())

    def expected(self, edges: list[str]) -> np.ndarray:
        """Plain FedAvg of the clipped increments of ``edges`` (float64)."""
        clip = self.config.secagg_clip
        w = np.array([self.samples[e] for e in edges], dtype=np.float64)
        xs = np.stack([np.clip(self.increments[e].astype(np.float64), -clip, clip) for e in edges])
        return (w[:, None] * xs).sum(axis=0) / w.sum()

    def bound(self, edges: list[str], mean: np.ndarray) -> np.ndarray:
        """The stated precision of the unmasked mean (secagg.decode_fixed: edges round stochastically)."""
        weight = sum(self.samples[e] for e in edges) if self.config.weighting == "samples" else len(edges)
        return len(edges) / (2.0**self.config.secagg_bits * weight) + 2.0**-23 * np.abs(mean) + 1e-12

    def check_no_unmasked_vector(self) -> None:
        """No value in the state directory is, or holds, one edge's unmasked vector in any form."""
        forms = []
        for e in self.ids:
            x = self.increments[e]
            forms.append(x.tobytes()[:64])
            forms.append(x.astype("<f8").tobytes()[:64])
            w = self.samples[e] if self.config.weighting == "samples" else 1
            enc = secagg.encode_fixed(x, w, self.config.secagg_clip, self.config.secagg_bits)
            forms.append(enc.astype("<u4").tobytes()[:64])
            forms.append((x.astype(np.float64) * self.samples[e]).astype("<f8").tobytes()[:64])
        with self.store._env.begin() as txn:  # every key and value the state directory holds
            for key, value in txn.cursor():
                for form in forms:
                    assert form not in value, f"an unmasked per-edge vector is stored under {key!r}"


def masked_stream(
    round_id: int, masked: np.ndarray, samples: int, encoding: int = pb.ENCODING_MASKED_INT,
    hidden: int = 0,
) -> list[pb.UploadMessage]:
    parts = np.split(masked, [LENGTHS[0], N] if hidden else [LENGTHS[0]])
    ids, exact = [0, 1, secagg.WEIGHT_TENSOR_ID][: len(parts)], [False, True, True][: len(parts)]
    enc = tensors.ChunkEncoder(parts, encoding, pb.COMPRESSION_ZSTD, chunk_elems=256, ids=ids, exact=exact)
    header = pb.UploadHeader(
        round_id=round_id, sample_count=samples, fingerprint=MANIFEST.fingerprint,
        encoding=encoding, compression=pb.COMPRESSION_ZSTD,
    )
    out = [pb.UploadMessage(header=header)]
    out += [pb.UploadMessage(chunk=c) for c in enc.chunks()]
    return out + [pb.UploadMessage(trailer=enc.trailer())]


@pytest.fixture
def sim(tmp_path: Path):
    made = []

    def make(n: int, **overrides) -> Sim:
        made.append(Sim(tmp_path / f"state-{len(made)}", n, **overrides))
        return made[-1]

    yield make
    for s in made:
        s.store.close()


def closed_mean(s: Sim) -> np.ndarray:
    history = s.fed.round_status(1)
    assert history.state == "CLOSED", history.message
    return s.fed.global_state().astype(np.float64)


def test_the_unmasked_sum_is_plain_fedavg_and_the_store_never_holds_an_unmasked_vector(sim) -> None:
    s = sim(5)
    s.join_and_advertise(s.ids)
    assert s.round.secure.threshold == 3 and s.round.secure.neighbours == 4  # complete graph, majority
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    s.reveal(s.ids)
    s.check_no_unmasked_vector()
    s.tick()

    got, want = closed_mean(s), s.expected(s.ids)
    assert np.all(np.abs(got - want) <= s.bound(s.ids, want))
    assert s.config.secagg_bits == 7 and np.abs(got - want).max() < 1e-5
    assert s.round.round_index == 1 and s.round.secure.phase == "ADVERTISE"  # the next round opened


def test_a_sparse_graph_closes_with_the_same_mean(sim) -> None:
    s = sim(8, secagg_neighbours=4)
    s.join_and_advertise(s.ids)
    assert s.round.secure.neighbours == 4 and s.round.secure.threshold == 3
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    s.reveal(s.ids)
    s.tick()
    got, want = closed_mean(s), s.expected(s.ids)
    assert np.all(np.abs(got - want) <= s.bound(s.ids, want))


@pytest.mark.parametrize(("weighting", "bits", "width"), [("samples", 4, 8), ("uniform", 8, 16)])
def test_compressed_uploads_unmask_to_exactly_the_sum_of_their_codes(sim, weighting, bits, width) -> None:
    # The parameters go as b-bit codes masked mod 2^width, the statistics in 32-bit fixed point.
    s = sim(5, weighting=weighting, secagg_code_bits=bits, secagg_sample_cap=3000.0)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids)
    assert {x.width() for x in s.sessions.values()} == {width}
    s.tick()
    s.reveal(s.ids)
    s.check_no_unmasked_vector()
    s.tick()
    got = closed_mean(s)
    clip, qmax, cut = s.config.secagg_clip, 2 ** (bits - 1) - 1, LENGTHS[0]
    span = s.fed.round_status(1).secure.code_range  # the first round's: [secure_aggregation] code_range
    assert span == s.config.secagg_code_range == 0.1
    weights = {e: (min(s.samples[e], 3000) / 3000 if weighting == "samples" else 1.0) for e in s.ids}
    # Each edge's codes, read back from what it says they stand for (code * step / weight).
    stood_for = {e: s.sessions[e].decoded[:cut].astype(np.float64) for e in s.ids}
    codes = {e: np.rint(x * (qmax * weights[e] / span)).astype(np.int64) for e, x in stood_for.items()}
    assert all(np.abs(c).max() <= qmax for c in codes.values())
    total = sum(codes.values())
    want = (total * (span / (qmax * sum(weights.values())))).astype(np.float32)
    assert np.array_equal(got[:cut].astype(np.float32), want)  # bit for bit
    # The statistics keep the fixed point's precision; the parameters are unbiased codes.
    stats_want = s.expected(s.ids)[cut:] if weighting == "samples" else np.mean(
        [np.clip(s.increments[e][cut:].astype(np.float64), -clip, clip) for e in s.ids], axis=0)
    assert np.all(np.abs(got[cut:] - stats_want) <= s.bound(s.ids, stats_want))
    moved = s.fed.round_status(1).bytes()
    assert moved.raw_up == 5 * (cut * width // 8 + 4 * LENGTHS[1])
    # The next round's codes are sized to this round's global increment and largest sample count.
    assert s.round.secure.code_range == secagg.next_code_range(got[:cut], span, clip) != span
    assert s.round.secure.sample_cap == max(s.samples.values())


@pytest.mark.parametrize("bits", [0, 4])
def test_hidden_weights_give_the_same_mean_and_the_server_only_their_sum(sim, bits) -> None:
    s = sim(5, secagg_hide_weights=True, secagg_code_bits=bits, secagg_code_range=8.0)
    s.whole_round(s.ids)
    closed = s.fed.round_status(1)
    assert closed.state == "CLOSED", closed.message
    # No upload declared its sample count; the round's weight is the unmasked sum of them.
    assert all(e.samples == 0 for e in closed.edges.values())
    assert closed.weight == sum(s.samples.values())
    got, want = closed_mean(s), s.expected(s.ids)
    if bits:  # codes: unbiased, within one step of each code (step 8/7 / weight) of FedAvg
        cap = s.config.secagg_sample_cap
        weights = [min(s.samples[e], cap) / cap for e in s.ids]
        assert np.all(np.abs(got - want)[: LENGTHS[0]] <= len(s.ids) * (8 / 7) / sum(weights) + 1e-6)
        assert np.all(np.abs(got - want)[LENGTHS[0] :] <= s.bound(s.ids, want)[LENGTHS[0] :])
    else:
        assert np.all(np.abs(got - want) <= s.bound(s.ids, want))
    if bits:  # the next round's cap: twice the mean weight (the counts themselves were never seen)
        assert s.round.secure.sample_cap == pytest.approx(2 * closed.weight / len(s.ids))


def test_uniform_weighting_keeps_increments_that_the_by_samples_precision_would_round_away(sim) -> None:
    # Weight 1 an upload: 25 fraction bits (from the quorum), where weighting by samples leaves 7,
    # at which every one of these increments (|x| < 2^-12) would encode as 0.
    s = sim(5, weighting="uniform")
    s.increments = {e: (x * 1e-4).astype(np.float32) for e, x in s.increments.items()}
    s.join_and_advertise(s.ids)
    assert s.config.secagg_bits == 25 and s.round.secure.frac_bits == 25
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    s.reveal(s.ids)
    s.tick()
    got = closed_mean(s)
    want = np.mean([s.increments[e].astype(np.float64) for e in s.ids], axis=0)
    assert np.abs(want).max() < 2.0**-12 and np.abs(want).mean() > 2.0**-16
    assert np.all(np.abs(got - want) <= s.bound(s.ids, want))
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_n_minus_t_edges_dropping_after_upload_still_close_the_round(sim) -> None:
    s = sim(5)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    s.reveal(s.ids[:3])  # 2 = n - t survivors go silent after their upload
    s.tick()
    got, want = closed_mean(s), s.expected(s.ids)  # their uploads are in the sum
    assert np.all(np.abs(got - want) <= s.bound(s.ids, want))


def test_n_minus_t_edges_dropping_before_upload_still_close_the_round(sim) -> None:
    s = sim(5)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids[:3])  # 2 dealt their shares, then dropped
    s.tick(10.0)  # the upload phase's deadline
    assert s.round.secure.dropped == s.ids[3:]
    s.reveal(s.ids[:3])
    s.tick()
    got, want = closed_mean(s), s.expected(s.ids[:3])
    assert np.all(np.abs(got - want) <= s.bound(s.ids[:3], want))


def test_more_than_n_minus_t_dropped_fails_the_round_and_leaves_the_state(sim) -> None:
    s = sim(5)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    s.reveal(s.ids[:2])  # 3 > n - t silent
    s.tick(10.0)
    failed = s.fed.round_status(1)
    assert failed.state == "FAILED"
    assert "too many edges dropped" in failed.message and "threshold is 3" in failed.message
    assert "global state is unchanged" in failed.message
    assert not s.fed.global_state().any() and s.fed.state_version == 1
    assert s.round.round_index == 0 and s.round.round_id == 2  # retried under a new id


def test_a_bad_share_a_replayed_key_and_a_share_for_another_round_are_refused_and_named(sim) -> None:
    s = sim(4)
    s.join_and_advertise(s.ids)
    r = s.round.round_id
    a, b = s.sessions["edge-0"], s.sessions["edge-1"]
    with pytest.raises(errors.SecureRefused, match="edge-0.*already advertised other keys"):
        s.fed.secure.advertise("edge-0", r, b.cipher.public, a.mask.public, Bytes())
    with pytest.raises(errors.WrongPhase):
        s.fed.secure.advertise("edge-9", r, *EdgeSession("edge-9", r, a.settings).advertisement(), Bytes())
    with pytest.raises(errors.UnknownRound):
        s.fed.secure.advertise("edge-0", r + 1, *a.advertisement(), Bytes())
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    view = s.fed.secure.secure_round("edge-1", r, "UPLOAD", 0)
    shares = b.reveal(view.survivors, view.dropped)
    bad = [(d, k, bytes(len(v)) if d == "edge-2" else v) for d, k, v in shares]
    with pytest.raises(errors.SecureRefused, match="share from edge-2 held by edge-1"):
        s.fed.secure.reveal("edge-1", r, bad, Bytes())
    wrong_kind = [(d, MASK_KEY if d == "edge-3" else k, v) for d, k, v in shares]
    with pytest.raises(errors.SecureRefused, match="edge-1.*may not reveal a mask_key share of 'edge-3'"):
        s.fed.secure.reveal("edge-1", r, wrong_kind, Bytes())
    with pytest.raises(errors.UnknownRound):
        s.fed.secure.reveal("edge-1", r + 7, shares, Bytes())
    s.reveal(s.ids)
    s.tick()
    assert s.fed.round_status(r).state == "CLOSED"

    # next round: a key of round 1 replayed, and a share committed for round 1
    s.join_and_advertise([])
    r2 = s.round.round_id
    s.fed.join("edge-0", MANIFEST, 0)
    with pytest.raises(errors.SecureRefused, match="edge-0.*already used by an earlier round"):
        s.fed.secure.advertise("edge-0", r2, *a.advertisement(), Bytes())
    with pytest.raises(errors.RoundClosed, match=f"round {r} has ended"):
        s.fed.secure.reveal("edge-1", r, shares, Bytes())


def test_a_share_committed_for_another_round_fails_its_commitment(sim) -> None:
    s = sim(3)
    s.join_and_advertise(s.ids)
    r = s.round.round_id
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    sec = s.round.secure
    good = s.sessions["edge-1"].held["edge-0"][0]
    commitment = bytes.fromhex(sec.commitments["edge-0"]["edge-1"][0])
    secagg.check_share("edge-0", "edge-1", r, good, commitment)
    with pytest.raises(secagg.BadShare, match="round 2"):
        secagg.check_share("edge-0", "edge-1", r + 1, good, commitment)


def test_the_stored_masked_upload_of_one_edge_looks_uniform(sim) -> None:
    s = sim(4)
    s.increments = {e: np.full(N, 0.25, np.float32) for e in s.ids}  # as far from uniform as it gets
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids[:1])
    with s.store._env.begin() as txn:
        stored = np.frombuffer(txn.get(KEY_MASKED_SUM), dtype="<u4").copy()
    assert stored.size == N + secagg.HIDDEN_VALUES and not stored[N:].any()  # room for hidden weights
    stored = stored[:N]
    # chi-square on the 256 byte values (4000 bytes): 255 degrees of freedom, p = 1e-4 at ~345
    counts = np.bincount(stored.view(np.uint8), minlength=256)
    expected = stored.size * 4 / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 345, chi2
    bits = np.unpackbits(stored.view(np.uint8)).mean()
    assert abs(bits - 0.5) < 0.01
    clip, bits = s.config.secagg_clip, s.config.secagg_bits
    plain = secagg.encode_fixed(s.increments["edge-0"], s.samples["edge-0"], clip, bits)
    assert len(np.unique(plain)) == 1 and len(np.unique(stored)) > N - 5


def homogeneity_chi2(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square statistic of a 2 x 256 table: do the byte values of ``a`` and ``b`` (uint8) come
    from one distribution? Under that hypothesis it follows chi2(255): p = 1e-4 at about 345."""
    table = np.stack([np.bincount(a, minlength=256), np.bincount(b, minlength=256)]).astype(np.float64)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / np.where(expected > 0, expected, 1)).sum())


@pytest.mark.parametrize("bits", [0, 4])
def test_masked_uploads_of_different_inputs_are_indistinguishable(sim, bits) -> None:
    # Two federations, one edge each uploading: one sends a constant, the other uniform noise. The
    # stored bytes of their masked uploads pass a two-sample test; the same test on the unmasked
    # encodings tells them apart at once (it has the power to).
    stored, plain = [], []
    for k, fill in enumerate((lambda n: np.full(n, 0.05, np.float32), None)):
        s = sim(4, secagg_code_bits=bits, weighting="uniform")
        if fill is not None:
            s.increments = {e: fill(N) for e in s.ids}
        s.join_and_advertise(s.ids)
        s.deal(s.ids)
        s.upload(s.ids[:1])
        with s.store._env.begin() as txn:
            masked = np.frombuffer(txn.get(KEY_MASKED_SUM), dtype="<u4")[: LENGTHS[0]]
        session = s.sessions[s.ids[0]]
        if bits:  # 8-bit masked codes: their low byte is what the wire and the sum carry
            assert session.width() == 8 and not (masked >> 8).any()
            stored.append(masked.astype(np.uint8))
            codes = np.rint(session.decoded[: LENGTHS[0]] * (7 / s.round.secure.code_range))
            plain.append(codes.astype(np.int64).astype(np.uint8))
        else:
            stored.append(masked.view(np.uint8))
            x = s.increments[s.ids[0]][: LENGTHS[0]]
            plain.append(secagg.encode_fixed(x, 1, s.config.secagg_clip, s.config.secagg_bits).view(np.uint8))
        assert k == 1 or len(np.unique(plain[-1])) <= 8  # the constant input really is constant
    assert homogeneity_chi2(*stored) < 345
    assert homogeneity_chi2(*plain) > 1000  # p below 1e-80


def test_an_aggregator_killed_at_every_step_resumes_the_round(sim) -> None:
    s = sim(5)
    s.join_and_advertise(s.ids)
    s.restart()
    assert s.round.secure.phase == "SHARE"
    s.deal(s.ids[:4])
    s.restart()
    s.deal(s.ids[4:])
    s.restart()
    s.upload(s.ids[:2])
    s.restart()
    s.upload(s.ids[2:4])  # edge-4 dealt, then dropped before upload
    s.restart()
    s.tick(10.0)
    s.restart()
    s.reveal(s.ids[:2])
    s.restart()
    s.reveal(s.ids[2:4])
    s.restart()
    s.tick()
    got, want = closed_mean(s), s.expected(s.ids[:4])
    assert np.all(np.abs(got - want) <= s.bound(s.ids[:4], want))


def test_modes_refuse_each_others_requests(sim) -> None:
    s = sim(3)
    s.join_and_advertise(s.ids)
    plain = s.fed.round_status()
    stream = masked_stream(plain.round_id, np.zeros(N, np.uint32), 10)
    stream[0].header.encoding = pb.ENCODING_FLOAT32
    with pytest.raises(errors.WrongMode, match="must be ENCODING_MASKED_INT"):
        s.fed.upload("edge-0", iter(stream))
    off = sim(3, secure_aggregation=False)
    off.fed.join("edge-0", MANIFEST, 0)
    with pytest.raises(errors.WrongMode, match="does not run secure aggregation"):
        off.fed.secure.advertise("edge-0", 1, *s.sessions["edge-0"].advertisement(), Bytes())
    with pytest.raises(errors.MalformedRequest, match="ENCODING_MASKED_INT is for secure aggregation"):
        off.fed.upload("edge-0", iter(masked_stream(1, np.zeros(N, np.uint32), 10)))
    assert off.fed.round_status().secure is None


def test_an_upload_before_its_phase_is_refused(sim) -> None:
    s = sim(3)
    s.join_and_advertise(s.ids)
    with pytest.raises(errors.WrongPhase, match="not UPLOAD"):
        s.fed.upload("edge-0", iter(masked_stream(s.round.round_id, np.zeros(N, np.uint32), 10)))


def test_an_upload_past_max_weight_sum_is_refused_so_the_sum_cannot_wrap(sim) -> None:
    s = sim(3, secagg_max_weight_sum=6000.0)
    s.samples = {"edge-0": 4000, "edge-1": 1500, "edge-2": 1000}
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids[:2])
    with pytest.raises(errors.OverWeight, match="edge-2.*6500, above 6000 .*max_weight_sum"):
        s.upload(s.ids[2:])
    assert s.round.weight == 5500.0


def test_an_unmasked_mean_beyond_the_clip_fails_the_round_and_leaves_the_state(sim, caplog) -> None:
    s = sim(3)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids)
    s.tick()
    # what an upload summed without its masks leaves (a slice: array arithmetic wraps mod 2^32 silently)
    s.fed.secure.masked[5:6] += np.uint32(1 << 30)
    with caplog.at_level(logging.WARNING, logger="aggregator.coordinator"):
        s.reveal(s.ids)
        s.tick()
    failed = s.fed.round_status(1)
    assert failed.state == "FAILED"
    assert "unmasking failed: the unmasked mean reaches" in failed.message
    assert "at element 5, beyond the clip 8" in failed.message
    assert "global state is unchanged" in failed.message
    assert not s.fed.global_state().any() and s.fed.state_version == 1
    assert s.round.round_id == 2 and s.round.round_index == 0  # retried under a new id
    assert any("round 1 failed: unmasking failed" in r.getMessage() for r in caplog.records)


def test_an_upload_whose_stream_outlasts_the_upload_phase_is_refused(sim) -> None:
    s = sim(4)
    s.join_and_advertise(s.ids)
    s.deal(s.ids)
    s.upload(s.ids[:3])
    e, session = "edge-3", s.sessions["edge-3"]
    view = s.fed.secure.secure_round(e, session.round_id, "SHARE", 0)
    session.receive(view.dealers, view.sealed, s.cipher_keys)
    masked = session.masked(s.increments[e], s.samples[e])
    header, *rest = masked_stream(session.round_id, masked, s.samples[e])

    def slow() -> Iterator[pb.UploadMessage]:
        yield header
        s.tick(10.0)  # the phase clock fixes the survivors while the stream is read
        yield from rest

    with pytest.raises(errors.WrongPhase, match="ended while the upload of 'edge-3' streamed"):
        s.fed.upload(e, slow())
    assert s.round.secure.survivors == s.ids[:3] and not s.round.edges[e].uploaded
    s.reveal(s.ids[:3])
    s.tick()
    got, want = closed_mean(s), s.expected(s.ids[:3])
    assert np.all(np.abs(got - want) <= s.bound(s.ids[:3], want))
