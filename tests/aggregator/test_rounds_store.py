"""Round records, their transitions, the store's round trip and the status-code table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.rounds import CLOSED, FAILED, OPEN, Bytes, RoundRecord, TrainingPlan, new_round
from aggregator.store import FORMAT_VERSION, KEY_ROUND, Manifest, StateLocked, Store, _put_record, _unwritten
from fedocr import errors, tensors


def record(round_id: int = 3, quorum: int = 2) -> RoundRecord:
    return RoundRecord(
        round_id=round_id,
        round_index=1,
        total_rounds=5,
        quorum=quorum,
        min_edges=1,
        opened_at=100.0,
        deadline=160.0,
        state_version=2,
        plan=TrainingPlan(1, 0.5, 8),
    )


def test_upload_checks_name_the_right_error() -> None:
    r = record()
    r.check_upload("a", 3)
    with pytest.raises(errors.UnknownRound):
        r.check_upload("a", 4)
    with pytest.raises(errors.UnknownRound):
        r.check_upload("a", 0)
    with pytest.raises(errors.RoundClosed):
        r.check_upload("a", 2)
    r.commit("a", 10, 10.0, Bytes(raw_up=40, wire_up=30), now=120.0)
    with pytest.raises(errors.DuplicateUpload):
        r.check_upload("a", 3)
    r.close(130.0)
    with pytest.raises(errors.RoundClosed):
        r.check_upload("b", 3)


def test_quorum_deadline_and_failure() -> None:
    r = record(quorum=2)
    r.join("a", 101.0)
    r.commit("a", 5, 5.0, Bytes(), 110.0)
    assert not r.quorum_reached() and not r.past_deadline(159.0) and r.past_deadline(160.0)
    r.commit("b", 5, 5.0, Bytes(), 111.0)
    assert r.quorum_reached() and r.weight == 10.0 and r.committed == 2
    f = record()
    f.fail(170.0)
    assert f.state == FAILED and "below the minimum of 1" in f.message
    assert r.state == OPEN and (r.close(1.0) or r.state) == CLOSED


def test_the_committed_count_is_kept_and_restored() -> None:
    r = record()
    r.join("a", 101.0)
    r.commit("a", 5, 5.0, Bytes(), 110.0)
    r.commit("a", 5, 5.0, Bytes(), 111.0)  # the same edge again (the coordinator refuses it first)
    r.join("b", 112.0)
    assert r.committed == 1 and r.has_uploaded("a") and not r.has_uploaded("b")
    back = RoundRecord.from_json(r.to_json())
    assert back.committed == 1
    apart = RoundRecord.from_json(r.to_json(with_edges=False), edges=list(r.edges.values()))
    assert apart.committed == 1 and apart.brief().committed == 0  # a brief copy holds no edges


def test_record_json_round_trip() -> None:
    r = record()
    r.join("edge-1", 101.5)
    r.commit("edge-1", 7, 7.0, Bytes(1, 2, 3, 4), 105.0)
    again = RoundRecord.from_json(r.to_json())
    assert again == r and again.bytes() == Bytes(1, 2, 3, 4)


def test_store_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    m = Manifest(((0, 2), (5, 1)), b"fp")
    store.init_model(m, np.zeros(3, dtype=np.float32), 1, record(1))
    r = record(1)
    r.commit("e", 2, 2.0, Bytes(), 1.0)
    store.commit_upload(r, np.array([1.0, 2.0, 3.0]))
    store.close()

    snap = Store(tmp_path / "s").load()

    assert snap.manifest == m and snap.state_version == 1 and snap.round == r
    assert snap.total.tolist() == [1.0, 2.0, 3.0] and snap.state.tolist() == [0.0, 0.0, 0.0]


def test_manifest_keeps_the_exact_flag_and_reads_old_pairs() -> None:
    m = Manifest(((0, 2, False), (1, 1, True)), b"fp")
    assert Manifest.from_json(m.to_json()) == m and m.tensors[1] == (1, 1, True)
    old = json.dumps({"tensors": [[0, 2], [1, 1]], "fingerprint": b"fp".hex()}).encode()
    assert Manifest.from_json(old).tensors == ((0, 2, False), (1, 1, False))
    with pytest.raises(errors.ModelMismatch, match="differ"):
        m.check_same(Manifest.from_json(old))


def test_store_finish_round_moves_to_history(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.init_model(Manifest(((0, 1),), b"fp"), np.zeros(1, dtype=np.float32), 1, record(1))
    done, following = record(1), record(2)
    done.close(5.0)
    store.finish_round(done, np.array([0.5], dtype=np.float32), 2, following)
    snap = store.load()
    assert [h.round_id for h in snap.history] == [1] and snap.round.round_id == 2
    assert snap.total is None and snap.state.tolist() == [0.5] and snap.state_version == 2


def _round_keys(store: Store) -> dict[bytes, bytes]:
    with store._env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor() if bytes(k).startswith(b"round/")}


def test_a_durable_write_puts_only_the_edges_that_changed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.init_model(Manifest(((0, 1),), b"fp"), np.zeros(1, dtype=np.float32), 1, record(1))
    r = record(1)
    for k in range(50):
        r.join(f"edge-{k}", 101.0)
    store.save_round(r)
    assert not r.dirty and b'"edges":' not in _round_keys(store)[KEY_ROUND]
    r.commit("edge-7", 3, 3.0, Bytes(raw_up=40), 110.0)
    assert r.dirty == {"edge-7"}
    puts: list[bytes] = []

    class Recorder:  # what the next write puts, key by key
        def put(self, key: bytes, value: bytes) -> None:
            puts.append(bytes(key))

    written = _put_record(Recorder(), r)  # type: ignore[arg-type]
    assert sorted(puts) == [KEY_ROUND, b"round/edge/edge-7"] and len(_round_keys(store)) == 51
    _unwritten(r, written)  # that write was not committed: the edge is still to be written
    assert r.dirty == {"edge-7"}

    class Failing:  # a write whose put of an edge fails (a full disk): the edge stays marked
        def put(self, key: bytes, value: bytes) -> None:
            if key.startswith(b"round/edge/"):
                raise OSError("no space left")

    with pytest.raises(OSError):
        _put_record(Failing(), r)  # type: ignore[arg-type]
    assert r.dirty == {"edge-7"}
    store.commit_upload(r, np.array([3.0]))
    store.close()
    again = Store(tmp_path / "s").load().round
    assert again == r and again.edges["edge-7"].uploaded and len(again.edges) == 50


def test_finishing_a_round_drops_its_edges_and_the_history_keeps_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.init_model(Manifest(((0, 1),), b"fp"), np.zeros(1, dtype=np.float32), 1, record(1))
    done = record(1)
    done.commit("a", 2, 2.0, Bytes(), 3.0)
    store.commit_upload(done, np.array([2.0]))
    done.close(5.0)
    store.finish_round(done, np.array([0.5], dtype=np.float32), 2, record(2))
    assert [k for k in _round_keys(store) if k.startswith(b"round/edge/")] == []
    snap = store.load()
    assert snap.round.edges == {} and snap.history[0].edges["a"].uploaded


def test_a_state_directory_of_the_previous_format_is_read_and_upgraded(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.init_model(Manifest(((0, 1),), b"fp"), np.zeros(1, dtype=np.float32), 1, record(1))
    old = record(1)
    old.join("a", 101.0)
    old.commit("b", 4, 4.0, Bytes(raw_up=8), 102.0)
    with store._env.begin(write=True) as txn:  # format 1: the round's edges inside its record
        txn.put(b"format", b"fedocr-aggregator/1")
        txn.put(KEY_ROUND, old.to_json())
    store.close()
    store = Store(tmp_path / "s")
    loaded = store.load().round
    assert loaded == old and loaded.dirty == {"a", "b"}
    store.save_round(loaded)  # the next write moves the edges to their own keys
    keys = _round_keys(store)
    assert b'"edges":' not in keys[KEY_ROUND] and {b"round/edge/a", b"round/edge/b"} <= set(keys)
    with store._env.begin() as txn:
        assert bytes(txn.get(b"format")) == FORMAT_VERSION
    store.close()
    assert Store(tmp_path / "s").load().round == old


def test_status_table() -> None:
    cases = {
        errors.MalformedRequest("x"): "INVALID_ARGUMENT",
        tensors.ChecksumMismatch("x"): "INVALID_ARGUMENT",
        tensors.NonFiniteValues("x"): "INVALID_ARGUMENT",
        tensors.ChunkTooLarge("x"): "RESOURCE_EXHAUSTED",
        errors.RoundClosed("x"): "FAILED_PRECONDITION",
        errors.UnknownRound("x"): "NOT_FOUND",
        errors.DuplicateUpload("x"): "ALREADY_EXISTS",
        errors.Busy("x"): "RESOURCE_EXHAUSTED",
        errors.Draining("x"): "UNAVAILABLE",
        errors.WrongRole("x"): "PERMISSION_DENIED",
        errors.ModelMismatch("x"): "PERMISSION_DENIED",
        KeyError("x"): None,
    }
    for exc, name in cases.items():
        assert errors.status_name_for(exc) == name, exc


def test_config_lr_decay_and_validation(tmp_path: Path) -> None:
    c = AggregatorConfig(learning_rate=1.0, lr_decay_rounds=(5, 30), lr_decay_factors=(0.1, 0.01))
    assert [c.learning_rate_for(i) for i in (0, 3, 4, 28, 29, 40)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    with pytest.raises(ConfigError):
        AggregatorConfig(quorum=1, min_edges=2)
    path = tmp_path / "a.toml"
    path.write_text(
        "[rounds]\nquorum = 3\nmin_edges = 2\n[plan]\nlr_decay_rounds = [2]\n"
        'lr_decay_factors = [0.5]\n[server]\nstate_dir = "st"\n'
    )
    loaded = AggregatorConfig.load(path, quorum=4)
    assert (loaded.quorum, loaded.min_edges, loaded.lr_decay_rounds) == (4, 2, (2,))
    assert loaded.state_dir == tmp_path / "st"
    path.write_text("[rounds]\nquorom = 3\n")
    with pytest.raises(ConfigError, match="quorom"):
        AggregatorConfig.load(path)


def test_cosine_lr_holds_until_its_round_then_falls_to_one_percent_at_the_last() -> None:
    c = AggregatorConfig(total_rounds=10, learning_rate=0.002, lr_cosine_from_round=7)
    lrs = [c.learning_rate_for(i) for i in range(10)]

    assert lrs[:6] == [0.002] * 6
    assert 0.002 > lrs[6] > lrs[7] > lrs[8] > lrs[9] > 0.00002  # rounds 7..10, each at its middle
    assert lrs[7] + lrs[8] == pytest.approx(0.002 * 1.01)  # symmetric about the cosine's middle
    with pytest.raises(ConfigError, match="lr_cosine_from_round must be within 0..total_rounds"):
        AggregatorConfig(total_rounds=10, lr_cosine_from_round=11)


def test_config_encodings(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[plan]\nencoding = "int4"\nerror_feedback = false\noptimizer = "adadelta"\n'
        '[transfer]\naccept_encodings = ["float32", "int4"]\ndownload_encoding = "int3"\n'
    )
    loaded = AggregatorConfig.load(path)
    assert (loaded.encoding, loaded.error_feedback, loaded.download_encoding) == ("int4", False, "int3")
    assert loaded.accept_encodings == ("float32", "int4")
    plan = new_round(loaded, 1, 0, 0.0, 1).plan
    assert (plan.encoding, plan.error_feedback, plan.optimizer) == ("int4", False, "adadelta")
    with pytest.raises(ConfigError, match="not in accept_encodings"):
        AggregatorConfig(encoding="int8", accept_encodings=("float32",))
    with pytest.raises(ConfigError, match="unknown encoding 'int5'"):
        AggregatorConfig(accept_encodings=("float32", "int5"))
    with pytest.raises(ConfigError, match="unknown download_encoding 'int1'; choose from float32"):
        AggregatorConfig(download_encoding="int1")
    path.write_text("[plan]\nerror_feedback = 1\n")
    with pytest.raises(ConfigError, match="error_feedback = 1 is not true or false"):
        AggregatorConfig.load(path)
    # A round record written before the plan carried an encoding still loads, as float32.
    record = new_round(AggregatorConfig(), 1, 0, 0.0, 1)
    doc = json.loads(record.to_json())
    for name in ("encoding", "error_feedback", "optimizer"):
        del doc["plan"][name]
    old = RoundRecord.from_json(json.dumps(doc).encode())
    assert (old.plan.encoding, old.plan.error_feedback, old.plan.optimizer) == ("float32", False, "")


def test_sample_config_loads() -> None:
    sample = Path(__file__).resolve().parents[2] / "deploy" / "aggregator.toml"
    config = AggregatorConfig.load(sample)
    assert config.weighting == "samples" and config.lr_decay_rounds == ()
    assert (config.learning_rate, config.batch_size) == (0.002, 16)  # the edges' default Adam recipe
    assert config.cert is not None and config.cert.name == "aggregator.pem"


def test_one_aggregator_per_state_directory(tmp_path: Path) -> None:
    first = Store(tmp_path / "s")
    with pytest.raises(StateLocked, match="in use"):
        Store(tmp_path / "s")
    first.close()
    Store(tmp_path / "s").close()


def test_cli_refuses_bad_config_and_plaintext(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aggregator import cli

    assert cli.main(["serve", "--quorum", "1", "--min-edges", "3"]) == 2
    assert "min_edges" in capsys.readouterr().err
    assert cli.main(["serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")]) == 1
    assert "mutual TLS is mandatory" in capsys.readouterr().err
