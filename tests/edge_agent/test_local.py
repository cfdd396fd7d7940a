"""The edge's local model: W_0 + G, the increment, and what leaves the edge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.agent import (
    FINAL_MODEL_FILE,
    OWN_MODEL_FILE,
    PERSONAL_MODEL_FILE,
    AgentError,
    AgentSettings,
    EdgeAgent,
)
from edge_agent.local import LocalModel, Plan
from edge_agent.report import Progress
from recognizer import state, train
from recognizer.keys import load_key
from recognizer.model_io import load_model, read_model_file


@pytest.fixture(scope="module")
def local(edge_data, federation_key: Path) -> LocalModel:
    return LocalModel(edge_data.shards[0], load_key(federation_key), "fedocr-tiny", 0.5)


def test_increment_is_zero_until_trained_and_reproduces_the_local_weights(local: LocalModel) -> None:
    rng = np.random.default_rng(0)
    # Small enough that no running variance (exported as 2**-5 at W_0) is pushed below zero.
    g = rng.normal(0, 0.001, local.length).astype(np.float32)
    local.apply_global(g)
    assert not local.increment().any()
    local.train_round(Plan(local_epochs=1, learning_rate=1e-3, batch_size=32))
    delta = local.increment()
    assert delta.dtype == np.float32 and delta.shape == (local.length,)
    assert np.isfinite(delta).all() and np.abs(delta).max() > 0
    # What the aggregator would add back: W_0 + g + delta is exactly the trained model.
    trained = state.pack_model(local.model, local._key)
    np.testing.assert_allclose(local._w0 + g + delta, trained, rtol=0, atol=1e-6)


def test_mixes_of_the_global_model_and_its_fine_tune_leave_the_upload_as_it_was(local: LocalModel) -> None:
    rng = np.random.default_rng(1)
    g = rng.normal(0, 0.001, local.length).astype(np.float32)
    local.apply_global(g)
    local.train_round(Plan(local_epochs=1, learning_rate=1e-3, batch_size=32))
    delta, trained = local.increment(), local.packed()
    local.mix(trained, 0.0)
    np.testing.assert_array_equal(local.packed(), local._w0 + g)  # the global model
    local.mix(trained, 0.5)
    np.testing.assert_allclose(local.packed(), local._w0 + g + 0.5 * delta, rtol=0, atol=1e-6)
    local.mix(trained, 1.0)
    np.testing.assert_array_equal(local.packed(), trained)
    local.mix(trained, 0.25)
    local.load(trained)  # what the personal model's choice does before the upload
    np.testing.assert_array_equal(local.increment(), delta)


def test_the_own_model_trains_apart_pulled_toward_the_global_model_and_leaves_the_upload(
    local: LocalModel,
) -> None:
    rng = np.random.default_rng(2)
    g = rng.normal(0, 0.001, local.length).astype(np.float32)
    local.apply_global(g)
    plan = Plan(local_epochs=1, learning_rate=1e-3, batch_size=32)
    local.train_round(plan)
    delta, trained = local.increment(), local.packed()
    base = local.base
    np.testing.assert_array_equal(base, local._w0 + g)
    start = trained  # an own model that has drifted from the global one

    def distance(v: np.ndarray) -> float:
        return float(np.linalg.norm((v - base)[: local.length - local.statistics]))

    free = local.train_own(start, plan, 0.0)
    pulled = local.train_own(start, plan, 100.0)
    assert np.isfinite(free).all() and np.isfinite(pulled).all()
    assert not np.array_equal(free, start)  # it trained
    # A strong pull brings it toward W_0 + G; without one it wanders further.
    assert distance(pulled) < distance(start) < distance(free)
    # The model the edge uploads from is untouched.
    np.testing.assert_array_equal(local.packed(), trained)
    np.testing.assert_array_equal(local.increment(), delta)


def test_apply_global_refuses_another_length(local: LocalModel) -> None:
    with pytest.raises(ValueError, match="values"):
        local.apply_global(np.zeros(local.length + 1, np.float32))


def test_saved_global_model_loads_with_the_key(
    local: LocalModel, federation_key: Path, tmp_path: Path
) -> None:
    local.apply_global(np.zeros(local.length, np.float32))
    path = tmp_path / "final.npz"
    local.save(path)
    model, meta = load_model(path, load_key(federation_key))
    assert meta["preset"] == "fedocr-tiny" and meta["gamma"] == 0.5
    packed = state.pack_model(model, local._key)
    np.testing.assert_array_equal(packed, local._w0)


def test_a_shard_with_any_labels_is_folded_to_the_alphabet_and_counted(
    tmp_path: Path, federation_key: Path
) -> None:
    from recognizer.lmdb_data import LmdbWriter
    from recognizer.synth import render_sample

    image, _ = render_sample(1, 0, "clean")
    shard = tmp_path / "any-shard"
    with LmdbWriter(shard) as writer:
        writer.add(image, "Naïve!", "clean")
        writer.add(image, "fine", "clean")
    local = LocalModel(shard, load_key(federation_key), "fedocr-tiny", 0.5)
    assert (local.labels.labels, local.labels.folded, local.labels.dropped_chars) == (2, 1, 2)
    kept = LocalModel(shard, load_key(federation_key), "fedocr-tiny", 0.5, alphabet="printable94")
    assert kept.labels.dropped_chars == 1  # the ï; the "!" is in printable94
    assert kept.fingerprint != local.fingerprint  # edges on other alphabets are refused


def test_local_training_runs_on_its_device_with_its_autocast(
    edge_data, federation_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = load_key(federation_key)
    local = LocalModel(edge_data.shards[0], key, "fedocr-tiny", 0.5, device="cpu", bf16=True)
    seen: dict = {}

    def spy(model, loader, optimizer, **kwargs) -> train.EpochStats:
        seen.update(kwargs, pin_memory=loader.pin_memory, workers=loader.num_workers)
        return train.EpochStats(epoch=kwargs["epoch"], loss=1.0, samples=0, seconds=0.0)

    monkeypatch.setattr(train, "train_epoch", spy)
    local.train_round(Plan(local_epochs=1, learning_rate=1e-3, batch_size=32))
    assert seen["device"] == torch.device("cpu") and seen["bf16"] is True
    assert seen["pin_memory"] is False and seen["workers"] == 0  # pinning is for a CUDA device only
    assert local.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in local.model.parameters())
    delta = local.increment()  # what leaves the edge: CPU float32, whatever the device
    assert isinstance(delta, np.ndarray) and delta.dtype == np.float32 and not delta.any()


def test_a_plan_learning_rate_unfit_for_the_edges_optimizer_is_warned_about_once(
    edge_data, federation_key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adam = LocalModel(edge_data.shards[0], load_key(federation_key), "fedocr-tiny", 0.5, optimizer="adam")
    adam.train_round(Plan(local_epochs=0, learning_rate=1e-3, batch_size=32))
    assert "far from" not in caplog.text
    for _ in range(2):  # the paper's Adadelta lr sent to an Adam edge
        adam.train_round(Plan(local_epochs=0, learning_rate=1.0, batch_size=32))
    assert caplog.text.count("learning rate 1 is far from adam's usual 0.002") == 1


def test_the_plans_optimizer_replaces_the_edges_own(edge_data, federation_key: Path) -> None:
    model = LocalModel(edge_data.shards[0], load_key(federation_key), "fedocr-tiny", 0.5, optimizer="adam")
    model.use_optimizer("")  # a plan that names none keeps the edge's
    assert isinstance(model._optimizer, torch.optim.Adam)
    model.use_optimizer("adadelta")
    assert isinstance(model._optimizer, torch.optim.Adadelta)
    with pytest.raises(ValueError, match="'sgd' is unknown here; this edge knows adam, adamw, adadelta"):
        model.use_optimizer("sgd")
    assert isinstance(model._optimizer, torch.optim.Adadelta)


def test_an_edge_can_start_from_a_pretrained_model(edge_data, federation_key: Path, tmp_path: Path) -> None:
    """W_0 becomes the pretrained weights; the fingerprint covers them (edges that start elsewhere
    disagree) while the saved model still loads under the key; a file that does not fit is refused."""
    from recognizer.model_io import ModelFileError

    key = load_key(federation_key)
    plain = LocalModel(edge_data.shards[0], key, "fedocr-tiny", 0.5)
    plain.train_round(Plan(local_epochs=1, learning_rate=1e-3, batch_size=32))
    pretrained = tmp_path / "pretrained.npz"
    plain.save(pretrained)
    trained = state.pack_model(plain.model, key)

    tuned = LocalModel(edge_data.shards[0], key, "fedocr-tiny", 0.5, init=pretrained)
    assert np.array_equal(state.pack_model(tuned.model, key), trained)
    assert not tuned.increment().any()  # W_0 + 0 is the pretrained model
    assert tuned.fingerprint != plain.fingerprint
    tuned.save(tmp_path / "final.npz")
    saved = load_model(tmp_path / "final.npz", key)[1]  # loads: named by the key's W_0, as any model file
    assert saved["fingerprint"] == load_model(pretrained, key)[1]["fingerprint"]

    with pytest.raises(ModelFileError, match=r"pretrained.npz: cannot start from it: gamma 0.5 \(here 0.25"):
        LocalModel(edge_data.shards[0], key, "fedocr-tiny", 0.25, init=pretrained)
    with pytest.raises(ModelFileError, match="pretrained.npz: made under another federation key"):
        LocalModel(edge_data.shards[0], bytes(32), "fedocr-tiny", 0.5, init=pretrained)
    with pytest.raises(ModelFileError, match="missing.npz: no such model file"):
        LocalModel(edge_data.shards[0], key, "fedocr-tiny", 0.5, init=tmp_path / "missing.npz")


def test_a_restarted_edge_trains_its_own_model_on_from_its_file_and_refuses_another_models(
    local: LocalModel, edge_data, tmp_path: Path
) -> None:
    settings = AgentSettings(work_dir=tmp_path, final_model=tmp_path / FINAL_MODEL_FILE, val=edge_data.test,
                             personal_model=tmp_path / PERSONAL_MODEL_FILE, own_prox=0.001)  # fmt: skip
    plan = Plan(local_epochs=1, learning_rate=1e-3, batch_size=32)
    local.apply_global(np.zeros(local.length, np.float32))
    starts: list[np.ndarray] = []
    real = local.train_own

    def spy(own: np.ndarray, plan: Plan, lam: float) -> np.ndarray:
        starts.append(own.copy())
        return real(own, plan, lam)

    local.train_own = spy  # records where each round's own training starts, then trains for real
    try:
        EdgeAgent(local, None, settings, Progress(quiet=True))._train_own(plan, 0.001)
        written = read_model_file(tmp_path / OWN_MODEL_FILE)[1]
        # A new agent in the same work directory (the edge restarted) goes on from the file.
        EdgeAgent(local, None, settings, Progress(quiet=True))._train_own(plan, 0.001)
    finally:
        del local.train_own
    np.testing.assert_array_equal(starts[0], local.base)  # the first time: the global model
    np.testing.assert_array_equal(starts[1], written)
    assert not np.array_equal(read_model_file(tmp_path / OWN_MODEL_FILE)[1], written)

    (tmp_path / OWN_MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(AgentError, match="own model cannot be read.*own.npz"):
        EdgeAgent(local, None, settings, Progress(quiet=True))._train_own(plan, 0.001)
