"""The federation end to end: a real aggregator and real edge-agent processes over mutual TLS."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.agent import PERSONAL_MIXES
from fedocr import encodings, harness
from fedocr.v1 import federation_pb2 as pb
from recognizer import state
from recognizer.dataset import make_loader
from recognizer.keys import load_key
from recognizer.lmdb_data import LmdbReader
from recognizer.model import build_model
from recognizer.model_io import load_model, model_from_packed, read_model_file
from recognizer.train import evaluate

PRESET, GAMMA = "fedocr-tiny", "1/2"
pytestmark = pytest.mark.timeout(420)


def journal(fed: harness.LocalFederation, name: str) -> list[dict]:
    path = fed.work / "edges" / name / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def uploaded(round_status: dict) -> set[str]:
    return {e["edge_id"] for e in round_status.get("edges", []) if e.get("uploaded")}


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_says(fed: harness.LocalFederation, name: str, text: str) -> bool:
    log = fed.work / "edges" / name / "edge.log"
    return log.exists() and text in log.read_text()


def counted_rounds(fed: harness.LocalFederation, name: str) -> list[int]:
    """Round ids of the uploads edge ``name`` journalled as counted."""
    return [r["round_id"] for r in journal(fed, name) if r.get("status") == "counted"]


def kill_edge_one_while_training(fed: harness.LocalFederation, edge_data, total_rounds: int) -> None:
    """Start the aggregator and both edges, then SIGKILL edge-1 once it trains round 1."""
    fed.start_aggregator(n_edges=2)
    fed.start_edge("edge-0", edge_data.shards[0])
    victim = fed.start_edge("edge-1", edge_data.shards[1])
    started = f"round 1 (1/{total_rounds}): training"
    wait_for(lambda: log_says(fed, "edge-1", started), 120, "edge-1 to start training")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


def held_out(model, data: Path) -> tuple[float, float]:
    """(loss, accuracy) on ``data``; a NaN loss (BN statistics scrambled) counts as infinite."""
    torch.set_num_threads(1)  # the edges may still be exiting; a second thread would wait on them
    result = evaluate(model, make_loader(data, 48, shuffle=False), beam_width=1)
    return (result.loss if math.isfinite(result.loss) else math.inf), result.accuracy


def test_two_edges_two_rounds(launch, edge_data, federation_key: Path, test_pki) -> None:
    # Uploads in int8 with error feedback (the plan's), downloads of the state's change in int4, a
    # FedProx term and a personal model on each edge; the other tests here move float32 both ways
    # without either.
    settings = harness.Settings(
        rounds=2, local_epochs=2, preset=PRESET, gamma=GAMMA, batch_size=24, encoding="int8",
        download_encoding="int4", proximal_mu=0.01,
        extra_edge_args=("--personalize", "--own-model", "--personal-epochs", "2"),
    )
    fed = launch(settings)
    fed.start_aggregator(n_edges=2)
    for k, shard in enumerate(edge_data.shards):
        fed.start_edge(f"edge-{k}", shard, val=edge_data.test)
    fed.wait_edges(timeout_s=300)
    history = harness.list_rounds(test_pki.dir, fed.port)
    fed.stop()

    # The rounds completed, each with both edges counted.
    rounds = history["rounds"]
    assert [r["round_index"] for r in rounds] == [0, 1]
    assert all(r["state"] in ("ROUND_STATE_CLOSED", "ROUND_STATE_FINISHED") for r in rounds), rounds
    assert all(uploaded(r) == {"edge-0", "edge-1"} for r in rounds)

    # Every round's upload was acknowledged with a receipt, and the journals' bytes are the server's bytes.
    records = {name: journal(fed, name) for name in ("edge-0", "edge-1")}
    edge_totals = dict.fromkeys(("raw_up", "wire_up", "raw_down", "wire_down"), 0)
    for name, recs in records.items():
        counted = [r for r in recs if r["event"] == "round"]
        assert [r["status"] for r in counted] == ["counted", "counted"], recs
        assert all(r["receipt"]["edge_id"] == name and len(r["receipt"]["sha256"]) == 64 for r in counted)
        for r in recs:
            edge_totals["raw_up"] += r.get("up", {}).get("raw", 0)
            edge_totals["wire_up"] += r.get("up", {}).get("wire", 0)
            edge_totals["raw_down"] += r["down"]["raw"]
            edge_totals["wire_down"] += r["down"]["wire"]
    assert edge_totals == {k: int(v) for k, v in history["total_bytes"].items()}
    assert edge_totals["raw_up"] > 0 and edge_totals["wire_down"] > 0

    # The edges followed the plan's encoding: int8 uploads, and each keeps the quantization error it
    # still owes in its work directory. Downloads: the first state whole in float32, then its change.
    key = load_key(federation_key)
    model = build_model(PRESET, key, 0.5)
    length, statistics = sum(state.state_lengths(model)), state.statistics_length(model)
    for name, recs in records.items():
        counted = [r for r in recs if r["event"] == "round"]
        assert all(r["plan"]["encoding"] == "int8" and r["plan"]["error_feedback"] for r in counted)
        assert all(r["rounding"] == "fit" for r in counted)  # nearest at fitted scales, with feedback
        assert all(r["plan"]["proximal_mu"] == 0.01 for r in counted)
        # The parameters in int8 (about a quarter of float32), the running statistics in float32.
        int8_bytes = encodings.payload_size(pb.ENCODING_INT8_QUANTIZED, length - statistics) + 4 * statistics
        assert all(r["up"]["raw"] == int8_bytes for r in counted)
        int4_bytes = encodings.payload_size(pb.ENCODING_INT4_QUANTIZED, length - statistics) + 4 * statistics
        downloads = [r["down"]["raw"] for r in recs if r["down"]["raw"]]
        assert downloads == [4 * length, int4_bytes, int4_bytes], recs
        residual = np.load(fed.work / "edges" / name / "residual.npz")["residual"]
        assert residual.shape == (length,) and 0 < np.abs(residual).max() < 1e-2

    # Federated evaluation: each round's result, scored by both edges on their held-out sets, is in
    # the aggregator's round record with the sample-weighted mean, as the edges' journals have it.
    for k, r in enumerate(rounds):
        scored = {e["edge_id"]: e["generic"] for e in r["evaluations"]}
        assert set(scored) == {"edge-0", "edge-1"}, r
        journaled = [[x["val"] for x in recs if x.get("val")][k + 1] for recs in records.values()]
        assert sorted(s["word_accuracy"] for s in scored.values()) == sorted(j["accuracy"] for j in journaled)
        mean = sum(j["accuracy"] * j["samples"] for j in journaled) / sum(j["samples"] for j in journaled)
        assert abs(r["evaluation"].get("word_accuracy", 0.0) - mean) < 1e-9
        assert all(e["personal"]["samples"] == e["generic"]["samples"] for e in r["evaluations"])

    # Each edge kept a personal model, never uploaded, scored every round beside the generic one: of
    # the global model, its mixes with its fine-tunes on the edge's shard and the edge's own model
    # (Ditto, own.npz, trained from its last weights), the one that read --val best, so never worse
    # there than the generic model. At the end it is that model for the final global model, a model
    # file like it, which reads --val as journalled; own.npz reads --val as its last score says.
    for name, recs in records.items():
        scored = [r for r in recs if r["event"] in ("round", "finished")]
        assert all(r["personal_val"]["samples"] > 0 and r["own_val"]["samples"] > 0 for r in scored)
        for r in scored:
            if r["personal_choice"] == "own":
                assert r["personal_mix"] is None and r["personal_val"] == r["own_val"], r
                assert r["own_val"]["accuracy"] >= r["val"]["accuracy"], r
            else:
                assert r["personal_choice"] == "mix" and r["personal_mix"] in PERSONAL_MIXES, r
                # The global model (epoch 0), or a mix with one of the fine-tunes: the round's one,
                # or at the end one of the final global model's two epochs at the personal lr.
                assert (r["personal_epoch"] == 0) == (r["personal_mix"] == 0), r
                assert r["personal_epoch"] <= (2 if r["event"] == "finished" else 1), r
        assert all(r["personal_val"]["accuracy"] >= r["val"]["accuracy"] for r in scored), scored
        assert recs[-1]["personal_model"].endswith("personal.npz")
        torch.set_num_threads(1)
        files = {"personal": "personal.npz", "own": "own.npz"}
        for what, file in files.items():
            model, _ = load_model(fed.work / "edges" / name / file, load_key(federation_key))
            loader = make_loader(edge_data.test, 64, shuffle=False, **model.image_options)  # as the edge's
            scored_here = evaluate(model, loader, beam_width=1)
            assert scored_here.accuracy == recs[-1][f"{what}_val"]["accuracy"], what
            assert scored_here.loss == pytest.approx(recs[-1][f"{what}_val"]["loss"], rel=1e-4), what
        vectors = {f: read_model_file(fed.work / "edges" / name / f)[1] for f in ("personal.npz", "final.npz",
                                                                                   "own.npz")}
        assert (vectors["personal.npz"].tobytes() == vectors["final.npz"].tobytes()) == \
            (recs[-1]["personal_mix"] == 0), recs[-1]
        assert (vectors["personal.npz"].tobytes() == vectors["own.npz"].tobytes()) == \
            (recs[-1]["personal_choice"] == "own"), recs[-1]
        # Three rounds of its own (two rounds and the end) moved it away from the final global model.
        assert not np.array_equal(vectors["own.npz"], vectors["final.npz"])

    # The global model's held-out loss fell from W_0 (round 1's state) to the final state.
    first = records["edge-0"][0]["val"]
    final = records["edge-0"][-1]
    assert final["event"] == "finished"
    assert final["val"]["loss"] < first["loss"] - 0.1, (first, final["val"])

    # The aggregator's state directory and log hold neither the key nor any layer name.
    names = {name for name, _ in state._state_entries(build_model(PRESET, key, 0.5))}
    words = {p for n in names for p in n.split(".") if len(p) > 3 and not p.isdigit()} - {"weight", "bias"}
    assert {"encoder", "decoder", "weight_real", "running_var"} <= words
    blobs = [p.read_bytes() for p in (fed.work / "aggregator").rglob("*") if p.is_file()]
    assert blobs and any(len(b) > 100_000 for b in blobs)  # the LMDB state is there
    for blob in blobs:
        assert key not in blob and key.hex().encode() not in blob
        assert not [w for w in words if w.encode() in blob]

    # The same global state read with the right key beats it read with a wrong key by a wide margin:
    # two int8 rounds do not make a model that reads yet, so this compares losses against each
    # other and against W_0 (the learning test compares a model that reads against a wrong key).
    final_model = fed.work / "edges" / "edge-0" / "final.npz"
    right, meta = load_model(final_model, key)
    _, packed = read_model_file(final_model)
    wrong, _ = model_from_packed(meta["preset"], meta["gamma"], bytes(32), packed)
    right_loss, right_acc = held_out(right, edge_data.test)
    wrong_loss, wrong_acc = held_out(wrong, edge_data.test)
    figures = (first["loss"], right_loss, wrong_loss)
    assert wrong_loss > right_loss + 0.5, figures
    assert wrong_loss > first["loss"] - 0.1, figures  # the wrong key does no better than W_0
    assert right_acc >= wrong_acc
    # Both edges wrote the same final model.
    other = read_model_file(fed.work / "edges" / "edge-1" / "final.npz")[1]
    np.testing.assert_array_equal(packed, other)


def test_edge_agents_run_a_secure_round(launch, edge_data, federation_key: Path, test_pki) -> None:
    # Compressed uploads: 4-bit codes of the parameters, masked modulo 2^8 (three edges), the running
    # statistics in 32-bit fixed point, and error feedback on the edges.
    settings = harness.Settings(
        rounds=1, local_epochs=1, preset=PRESET, gamma=GAMMA, batch_size=24, secure_aggregation=True,
        secure_code_bits=4,
    )
    fed = launch(settings)
    fed.start_aggregator(n_edges=3)  # a secure round unmasks no fewer than three uploads
    for k, shard in enumerate([*edge_data.shards, edge_data.test]):
        fed.start_edge(f"edge-{k}", shard)
    fed.wait_edges(timeout_s=300)
    history = harness.list_rounds(test_pki.dir, fed.port)
    fed.stop()

    (closed,) = history["rounds"]
    assert closed["state"] in ("ROUND_STATE_CLOSED", "ROUND_STATE_FINISHED"), closed
    assert closed["plan"]["secure"]["enabled"] and closed["plan"]["encoding"] == "ENCODING_MASKED_INT"
    assert uploaded(closed) == {"edge-0", "edge-1", "edge-2"}
    assert closed["plan"]["secure"]["bits"] == 4
    model = build_model(PRESET, load_key(federation_key), 0.5)
    length, statistics = sum(state.state_lengths(model)), state.statistics_length(model)
    for name in ("edge-0", "edge-1", "edge-2"):
        (record,) = [r for r in journal(fed, name) if r["event"] == "round"]
        # a byte a parameter, four a statistic: against 4 * length in 32-bit fixed point
        assert record["status"] == "counted" and record["up"]["raw"] == (length - statistics) + 4 * statistics
        assert record["plan"]["encoding"] == "ENCODING_MASKED_INT" and record["plan"]["error_feedback"]
        assert record["rounding"] is None  # the secure codes' own (stochastic) rounding, not "fit"
        residual = np.load(fed.work / "edges" / name / "residual.npz")["residual"]
        assert residual.shape == (length,) and np.abs(residual[: length - statistics]).max() > 0
    first = read_model_file(fed.work / "edges" / "edge-0" / "final.npz")[1]
    np.testing.assert_array_equal(first, read_model_file(fed.work / "edges" / "edge-1" / "final.npz")[1])
    assert np.abs(first).max() > 0


def test_warm_up_rounds_train_on_words_each_edge_renders_and_later_rounds_rehearse_them(
    launch, edge_data, test_pki
) -> None:
    settings = harness.Settings(
        rounds=2, local_epochs=1, preset=PRESET, gamma=GAMMA, batch_size=24, warmup_rounds=1,
        warmup_words=48, warmup_styles="clean,rotated", warmup_labels="digits", warmup_rehearsal=0.25,
    )
    fed = launch(settings)
    fed.start_aggregator(n_edges=2)
    for k, shard in enumerate(edge_data.shards):
        fed.start_edge(f"edge-{k}", shard)
    fed.wait_edges(timeout_s=300)
    rounds = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
    fed.stop()

    assert rounds[0]["plan"]["warmup"] == {"words": 48, "styles": "clean,rotated", "labels": "digits",
                                           "seed": "0"}
    assert "warmup" not in rounds[1]["plan"]  # unset: an ordinary round, which rehearses the same words
    assert rounds[1]["plan"]["rehearsal"] == {"words": rounds[0]["plan"]["warmup"], "share": 0.25}
    rendered, shard_sizes = [], {}
    for k, shard in enumerate(edge_data.shards):
        size = shard_sizes[f"edge-{k}"] = len(LmdbReader(shard))
        counted = [r for r in journal(fed, f"edge-{k}") if r["event"] == "round"]
        assert [(r["warmup"], r["samples"]) for r in counted] == [(True, 48), (False, size)]
        assert [r["rehearsed"] for r in counted] == [0, min(48, round(0.25 * size))]
        (data,) = (fed.work / "edges" / f"edge-{k}").glob("warmup-*")  # rendered once, rehearsed from there
        reader = LmdbReader(data)
        rendered.append([reader.get_label(i) for i in range(len(reader))])
        log = (fed.work / "edges" / f"edge-{k}" / "edge.log").read_text()
        assert log.count("rendering warm-up words: 48/48") == 1
        assert f"on {size} words and {min(48, round(0.25 * size))} warm-up words" in log
    assert all(len(labels) == 48 and all(x.isdigit() for x in labels) for labels in rendered)
    assert rendered[0] != rendered[1]  # each edge renders its own words
    # The warm-up round counted each edge at its rendered words' weight.
    assert {e["edge_id"]: int(e["samples"]) for e in rounds[0]["edges"]} == {"edge-0": 48, "edge-1": 48}
    # The rehearsing round weighs each edge by its shard alone.
    assert {e["edge_id"]: int(e["samples"]) for e in rounds[1]["edges"]} == shard_sizes


def test_edges_train_on_data_encrypted_with_the_common_image_key(launch, edge_data, test_pki, federation_key,
                                                                tmp_path):
    from recognizer.dataset import image_to_array
    from recognizer.image_crypt import cipher_for_preset
    from recognizer.keys import generate_key
    from recognizer.model import PRESETS

    image_key = tmp_path / "image.key"
    generate_key(image_key)
    settings = harness.Settings(
        rounds=2, local_epochs=1, preset="vitstr-tiny", gamma=GAMMA, batch_size=24, warmup_rounds=1,
        warmup_words=24, warmup_styles="clean", warmup_labels="digits",
        extra_edge_args=("--image-key", str(image_key)),
    )
    fed = launch(settings)
    fed.start_aggregator(n_edges=2)
    for k, shard in enumerate(edge_data.shards):
        fed.start_edge(f"edge-{k}", shard, val=edge_data.test)
    fed.wait_edges(timeout_s=300)
    rounds = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
    fed.stop()

    assert [r["state"] for r in rounds][-1] in ("ROUND_STATE_CLOSED", "ROUND_STATE_FINISHED")
    assert all(uploaded(r) == {"edge-0", "edge-1"} for r in rounds)
    cipher, config = cipher_for_preset(load_key(image_key), "vitstr-tiny"), PRESETS["vitstr-tiny"]
    for k, shard in enumerate(edge_data.shards):
        home = fed.work / "edges" / f"edge-{k}"
        (encrypted,) = home.glob(f"encrypted-{shard.name}-*")
        assert [len(list(home.glob(f"encrypted-{name}-*"))) for name in ("warmup", "test")] == [1, 1]
        plain, secret = LmdbReader(shard), LmdbReader(encrypted)
        assert len(secret) == len(plain)
        for i in (0, len(plain) - 1):  # stored encrypted: decrypted, the image as the model reads it
            assert secret.get_label(i) == plain.get_label(i)
            stored = np.asarray(secret.get(i)[0])
            want = image_to_array(plain.get(i)[0], config.input_hw, config.keep_aspect)
            assert not np.array_equal(stored, want)
            np.testing.assert_array_equal(cipher.decrypt(stored), want)
        counted = [r for r in journal(fed, f"edge-{k}") if r["event"] == "round"]
        assert [r["warmup"] for r in counted] == [True, False] and all(r["val"] for r in counted)
        assert log_says(fed, f"edge-{k}", "encrypting")
    # The edge's model is aligned to the image key: its score of the final state on the encrypted held-out
    # set is the plain model file's score on the plain set (the file keeps the plain meaning).
    (finished,) = [r for r in journal(fed, "edge-0") if r["event"] == "finished"]
    model, _ = load_model(Path(finished["model"]), load_key(federation_key))
    loader = make_loader(edge_data.test, 64, shuffle=False, **model.image_options)
    result = evaluate(model, loader, beam_width=1)
    assert finished["val"]["samples"] == result.samples
    assert abs(finished["val"]["loss"] - result.loss) < 1e-4 * max(1.0, result.loss)
    assert finished["val"]["accuracy"] == result.accuracy


def test_killed_edge_round_closes_at_minimum_and_edge_rejoins(launch, edge_data, test_pki) -> None:
    settings = harness.Settings(
        rounds=2,
        local_epochs=3,
        preset=PRESET,
        gamma=GAMMA,
        batch_size=24,
        quorum=2,
        min_edges=1,
        deadline_s=25.0,
    )
    fed = launch(settings)
    kill_edge_one_while_training(fed, edge_data, total_rounds=2)

    def round_one_closed() -> dict | None:
        rounds = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
        return rounds[0] if rounds and rounds[0]["state"] != "ROUND_STATE_OPEN" else None

    first = wait_for(round_one_closed, 90, "round 1 to close at its deadline", every=0.5)
    assert first["state"] == "ROUND_STATE_CLOSED", first
    assert uploaded(first) == {"edge-0"}

    fed.start_edge("edge-1", edge_data.shards[1])  # restarted: it must take part in round 2
    fed.wait_edges(timeout_s=200)
    rounds = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
    assert [uploaded(r) for r in rounds] == [{"edge-0"}, {"edge-0", "edge-1"}]
    assert counted_rounds(fed, "edge-1") == [int(rounds[1]["round_id"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edges_wait_for_a_late_aggregator_and_ride_out_its_restart(launch, edge_data, test_pki) -> None:
    settings = harness.Settings(rounds=2, local_epochs=2, preset=PRESET, gamma=GAMMA, batch_size=24)
    fed = launch(settings)
    fed.port = free_port()
    for k, shard in enumerate(edge_data.shards):  # no aggregator yet: the edges back off and retry
        fed.start_edge(f"edge-{k}", shard)
    for name in ("edge-0", "edge-1"):
        wait_for(lambda n=name: log_says(fed, n, "aggregator unavailable"), 120, f"{name} to retry")
    fed.start_aggregator(n_edges=2, port=fed.port)
    wait_for(lambda: log_says(fed, "edge-0", "round 1 (1/2): training"), 120, "round 1 to start")
    fed.aggregator.kill()  # mid-round, nothing graceful
    time.sleep(1.0)
    fed.start_aggregator(n_edges=2, port=fed.port)  # same state directory: the round resumes
    fed.wait_edges(timeout_s=240)
    rounds = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
    assert [uploaded(r) for r in rounds] == [{"edge-0", "edge-1"}] * 2
    for name in ("edge-0", "edge-1"):
        statuses = [r["status"] for r in journal(fed, name) if r["event"] == "round"]
        assert statuses.count("counted") + statuses.count("duplicate") == 2, statuses


def test_a_restarted_edge_rejoins_the_round_in_progress(launch, edge_data, test_pki) -> None:
    settings = harness.Settings(
        rounds=1,
        local_epochs=2,
        preset=PRESET,
        gamma=GAMMA,
        batch_size=24,
        quorum=2,
        min_edges=2,
        deadline_s=120.0,
    )
    fed = launch(settings)
    kill_edge_one_while_training(fed, edge_data, total_rounds=1)
    fed.start_edge("edge-1", edge_data.shards[1])  # the same round is still open: it trains it again
    fed.wait_edges(timeout_s=200)
    (only,) = harness.list_rounds(test_pki.dir, fed.port)["rounds"]
    assert only["state"] in ("ROUND_STATE_CLOSED", "ROUND_STATE_FINISHED")
    assert uploaded(only) == {"edge-0", "edge-1"}
    assert counted_rounds(fed, "edge-1") == [int(only["round_id"])]
