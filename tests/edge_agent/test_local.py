"""The edge's local model: W_0 + G, the increment, and what leaves the edge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.local import LocalModel, Plan
from recognizer import state
from recognizer.keys import load_key
from recognizer.model_io import load_model


@pytest.fixture(scope="module")
def local(edge_data, federation_key: Path) -> LocalModel:
    return LocalModel(edge_data.shards[0], load_key(federation_key), "fedocr-tiny", 0.5)


def test_increment_is_zero_until_trained_and_reproduces_the_local_weights(local: LocalModel) -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(0, 0.01, local.length).astype(np.float32)
    local.apply_global(g)
    assert not local.increment().any()
    local.train_round(Plan(local_epochs=1, learning_rate=1.0, batch_size=32))
    delta = local.increment()
    assert delta.dtype == np.float32 and delta.shape == (local.length,)
    assert np.isfinite(delta).all() and np.abs(delta).max() > 0
    # What the aggregator would add back: W_0 + g + delta is exactly the trained model.
    trained = state.pack_state(state.export_state(local.model), local._key)
    np.testing.assert_allclose(local._w0 + g + delta, trained, rtol=0, atol=1e-6)


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
    packed = state.pack_state(state.export_state(model), local._key)
    np.testing.assert_array_equal(packed, local._w0)


def test_a_shard_with_labels_outside_the_vocabulary_is_refused(tmp_path: Path, federation_key: Path) -> None:
    from recognizer.lmdb_data import DatasetError, LmdbWriter
    from recognizer.synth import render_sample

    image, _ = render_sample(1, 0, "clean")
    shard = tmp_path / "bad-shard"
    with LmdbWriter(shard) as writer:
        writer.add(image, "naïve", "clean")
    with pytest.raises(DatasetError, match="outside the vocabulary"):
        LocalModel(shard, load_key(federation_key), "fedocr-tiny", 0.5)
