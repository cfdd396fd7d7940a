"""The [secure_aggregation] settings, and the secure round record's JSON and LMDB round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.rounds import RoundRecord, new_round
from aggregator.secure import SHARE, OutsideClip, SecureRecord
from aggregator.store import Manifest, Store
from fedocr import secagg
from fedocr.v1 import federation_pb2 as pb


def test_secure_aggregation_is_off_by_default_and_rounds_carry_no_secure_record() -> None:
    config = AggregatorConfig()
    assert not config.secure_aggregation
    assert new_round(config, 1, 0, 0.0, 1).secure is None


def test_the_toml_table_turns_it_on(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(
        "[rounds]\nquorum = 5\nmin_edges = 3\n"
        "[secure_aggregation]\nenabled = true\nthreshold = 3\nneighbours = 4\nclip = 2.0\nphase_s = 30\n"
    )
    config = AggregatorConfig.load(path)
    assert config.secure_aggregation and config.secagg_threshold == 3 and config.secagg_neighbours == 4
    assert config.secagg_clip == 2.0 and config.secagg_phase_s == 30.0
    assert config.secagg_bits == 9  # 2e6 x (2 x 2^9 + 1) < 2^31 <= 2e6 x (2 x 2^10 + 1)
    secagg.check_headroom(config.secagg_max_weight_sum, config.secagg_clip, config.secagg_bits)
    with pytest.raises(secagg.SecAggError):
        secagg.check_headroom(config.secagg_max_weight_sum, config.secagg_clip, config.secagg_bits + 1)


def test_default_precision_for_200_edges_of_10000_samples() -> None:
    config = AggregatorConfig(secure_aggregation=True, quorum=3)
    assert (config.secagg_clip, config.secagg_max_weight_sum, config.secagg_bits) == (8.0, 2e6, 7)


def test_uniform_weighting_takes_its_fraction_bits_from_the_quorum() -> None:
    # Weight 1 an upload: a round's weights sum to at most its quorum, not to max_weight_sum.
    config = AggregatorConfig(secure_aggregation=True, weighting="uniform", quorum=5, min_edges=3)
    assert config.secagg_weight_limit == 5.0
    assert config.secagg_bits == 25  # 5 x (8 x 2^25 + 1) < 2^31 <= 5 x (8 x 2^26 + 1)
    secagg.check_headroom(config.secagg_weight_limit, config.secagg_clip, config.secagg_bits)
    with pytest.raises(secagg.SecAggError):
        secagg.check_headroom(config.secagg_weight_limit, config.secagg_clip, config.secagg_bits + 1)
    by_samples = AggregatorConfig(secure_aggregation=True, quorum=5, min_edges=3)
    assert by_samples.secagg_weight_limit == 2e6 and by_samples.secagg_bits == 7


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"secagg_threshold": 1}, "threshold must be 0"),
        ({"secagg_threshold": -2}, "threshold must be 0"),
        ({"secure_aggregation": True, "secagg_threshold": 4, "quorum": 5, "min_edges": 2},
         "exceeds min_edges 3"),
        ({"secure_aggregation": True, "quorum": 2}, "quorum of at least 3"),
        ({"secagg_neighbours": 3}, "neighbours must be 0"),
        ({"secagg_neighbours": 2, "secagg_threshold": 4, "quorum": 4, "min_edges": 4}, "neighbours must"),
        ({"secagg_clip": 0.0}, "clip must be positive"),
        ({"secagg_clip": float("nan")}, "clip must be positive"),
        ({"secagg_max_weight_sum": 0.0}, "max_weight_sum"),
        ({"secagg_frac_bits": 31}, "frac_bits must be within"),
        ({"secagg_frac_bits": 20}, "wrap"),
        ({"secure_aggregation": True, "quorum": 3, "secagg_phase_s": 0.0}, "phase_s must be positive"),
        ({"secagg_code_bits": 1}, "code_bits must be 0"),
        ({"secagg_code_bits": 9}, "code_bits must be 0"),
        ({"secagg_sample_cap": 0.5}, "sample_cap must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**settings)


def test_secure_rounds_need_three_uploads_and_min_edges_may_ask_for_more() -> None:
    # With two uploads each edge would read the other's update off the published mean.
    assert AggregatorConfig(secure_aggregation=True, quorum=5, min_edges=1).round_min_edges == 3
    assert AggregatorConfig(secure_aggregation=True, quorum=5, min_edges=4).round_min_edges == 4
    assert AggregatorConfig(quorum=5, min_edges=1).round_min_edges == 1  # plain rounds as set
    r = new_round(AggregatorConfig(secure_aggregation=True, quorum=5, min_edges=2), 1, 0, 0.0, 1)
    assert r.min_edges == 3


def test_unknown_keys_in_the_table_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text("[secure_aggregation]\nenable = true\n")
    with pytest.raises(ConfigError, match="unknown key 'enable' in \\[secure_aggregation\\]"):
        AggregatorConfig.load(path)


def secure_record() -> RoundRecord:
    config = AggregatorConfig(secure_aggregation=True, quorum=3, min_edges=2)
    r = new_round(config, 4, 1, 10.0, 2)
    sec = r.secure
    keys = {e: (secagg.generate_keypair(), secagg.generate_keypair()) for e in ("a", "b", "c")}
    for e, (c, s) in keys.items():
        sec.advertise(e, c.public, s.public, set())
    assert sec.fix_roster(11.0, 5.0) == "" and sec.phase == SHARE
    sec.sealed["b"] = {"a": "ab" * 160}
    sec.commitments["a"] = {"a": ["00" * 32, "11" * 32]}
    sec._blob("dealt/a", {"sealed": {"b": "ab" * 160}, "commitments": sec.commitments["a"]})
    sec._blob("revealed/b", [["self_seed", "a", "cd" * 66]])
    sec.revealed["self_seed"] = {"a": {"b": "cd" * 66}}
    return r


def test_the_secure_record_survives_json_without_its_blobs() -> None:
    r = secure_record()
    back = RoundRecord.from_json(r.to_json())
    assert isinstance(back.secure, SecureRecord)
    assert back.secure.core() == r.secure.core() and not back.secure.commitments
    assert back.secure.graph() == r.secure.graph() and back.secure.index("c") == 3
    text = r.to_json()  # sealed and revealed shares are blobs, never in the record
    assert ("ab" * 160).encode() not in text and ("cd" * 66).encode() not in text


def test_the_secure_record_and_masked_sum_survive_the_store(tmp_path: Path) -> None:
    r = secure_record()
    store = Store(tmp_path / "state")
    manifest = Manifest(((0, 4, False),), b"f" * 32)
    store.init_model(manifest, np.zeros(4, np.float32), 2, r)
    masked = np.array([1, 2**32 - 1, 7, 0], dtype=np.uint32)
    store.commit_upload(r, np.zeros(4), masked)
    store.close()
    store = Store(tmp_path / "state")
    snap = store.load()
    assert snap.round == r and snap.masked.dtype == np.uint32 and snap.masked.tolist() == masked.tolist()
    assert snap.round.secure.revealed == r.secure.revealed and snap.round.secure.sealed == r.secure.sealed
    assert snap.total is None  # a secure round keeps no float sum
    store.finish_round(r, np.ones(4, np.float32), 3, None)
    after = store.load()
    assert after.masked is None and after.history[0].secure.core() == r.secure.core()
    with store._env.begin() as txn:
        assert not [k for k, _ in txn.cursor() if k.startswith(b"secure/")]
    store.close()


def test_decode_refuses_a_mean_beyond_the_clip_by_more_than_one_step() -> None:
    record = SecureRecord.new(1, 1.0, 2, False, 0, 0)  # clip 1, 2 fractional bits: a step of 0.25
    within = np.array([4, 5, -5], dtype=np.int32).view(np.uint32)
    np.testing.assert_array_equal(record.decode(within, 1.0), [1.0, 1.25, -1.25])
    with pytest.raises(OutsideClip, match=r"\|x\| = 1.5 at element 1, beyond the clip 1"):
        record.decode(np.array([0, -6, 3], dtype=np.int32).view(np.uint32), 1.0)


def test_compressed_uploads_take_the_narrowest_width_that_cannot_wrap_and_decode_within_the_clip() -> None:
    # 4-bit codes: 7 a value at most; 18 edges sum within ±126 (8 bits), 19 need 16 bits.
    assert [secagg.masked_width(4, n) for n in (3, 18, 19, 1000, 4681, 4682)] == [8, 8, 16, 16, 16, 32]
    record = SecureRecord.new(1, 1.0, 20, False, 0, 0, bits=4)
    record.roster, record.survivors = ["a", "b", "c"], ["a", "b", "c"]
    assert record.upload_encoding() == pb.ENCODING_MASKED_INT8
    for _ in range(3):
        record.add_code_weight(1.0)
    exact = np.array([False, False, True])
    total = np.array([21, (-21) % 256 + 256 * 5, int(np.int32(3 << 20).view(np.uint32))], dtype=np.uint32)
    # codes: 21 / (7·3) = 1.0, the low 8 bits of the second read as -21 (-1.0); the exact value is fixed point
    np.testing.assert_allclose(record.decode(total, 3.0, exact), [1.0, -1.0, 1.0])
    with pytest.raises(OutsideClip, match="beyond the clip 1"):
        record.decode(np.array([100, 0, 0], dtype=np.uint32), 3.0, exact)  # 100/21 = 4.8 > 1 + 3/21
