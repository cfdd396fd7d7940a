"""WordDataset tensors and targets, the loader's batches, and the vocabulary check."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from recognizer import charset
from recognizer.dataset import WordDataset, make_loader
from recognizer.lmdb_data import DatasetError, LmdbWriter

LABELS = ["Ab1", "hello", "X", "x" * 30, "end."]


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def words(tmp_path):
    with LmdbWriter(tmp_path / "words") as writer:
        for i, label in enumerate(LABELS):
            writer.add(_png((20 + 10 * i, 16 + i), (255, 0, 51 * i)), label)
    return tmp_path / "words"


def test_item_shapes_ranges_and_target(words):
    ds = WordDataset(words, input_hw=(32, 100), max_len=8)

    image, target, label = ds[0]

    assert len(ds) == 5 and label == "Ab1"
    assert image.shape == (3, 32, 100) and image.dtype == torch.float32
    assert image[0].eq(1.0).all() and image[1].eq(-1.0).all()  # pure red: 255 -> 1, 0 -> -1
    assert target.dtype == torch.int64
    assert target.tolist() == [36, 11, 1, charset.EOS] + [charset.PAD] * 4  # 'A'=36, 'b'=11, '1'=1


def test_long_label_is_cut_to_max_len_and_kept_whole_in_the_label(words):
    _, target, label = WordDataset(words, max_len=charset.MAX_SEQ_LEN)[3]
    assert label == "x" * 30
    assert target.shape == (26,) and target[-1].item() == charset.EOS
    assert charset.decode(target.tolist()) == "x" * 25


def test_default_size_is_aster_input(words):
    image, target, _ = WordDataset(words)[4]
    assert image.shape == (3, 64, 256) and target.shape == (charset.MAX_SEQ_LEN,)
    assert -1.0 <= image.min() and image.max() <= 1.0


def test_loader_batches(words):
    loader = make_loader(words, batch_size=2, shuffle=False)

    batches = list(loader)

    images, targets, labels = batches[0]
    # Targets are cut to the batch's longest label plus EOS: "hello" + EOS.
    assert len(batches) == 3 and images.shape == (2, 3, 64, 256) and targets.shape == (2, 6)
    assert targets[0].tolist() == charset.encode("Ab1") + [charset.PAD] * 2
    assert targets[1, -1] == charset.EOS
    assert labels == ["Ab1", "hello"] and batches[-1][2] == ["end."]
    assert len(list(make_loader(words, batch_size=2, shuffle=False, drop_last=True))) == 2


def test_shuffle_is_fixed_by_seed(words):
    def order(seed):
        return [label for _, _, labels in make_loader(words, 1, shuffle=True, seed=seed) for label in labels]

    assert order(4) == order(4) and sorted(order(4)) == sorted(LABELS)
    assert any(order(4) != order(s) for s in range(5, 10))


def test_workers_open_their_own_environment(words):
    loader = make_loader(words, batch_size=2, shuffle=False, workers=2)
    loader.dataset[0]  # the parent holds the LMDB open when the workers fork

    labels = [label for _, _, batch in loader for label in batch]

    assert labels == LABELS


def test_vocabulary_check_names_bad_characters_and_first_key(tmp_path):
    with LmdbWriter(tmp_path / "bad") as writer:
        for label in ["fine", "café", "ok", "naïve €"]:
            writer.add(_png((8, 8), (0, 0, 0)), label)
    WordDataset(tmp_path / "bad")  # unchecked by default
    with pytest.raises(DatasetError, match=r"bad: 2 label\(s\)") as err:
        WordDataset(tmp_path / "bad", check_labels=True)
    assert str(err.value).endswith(": ' ' 'é' 'ï' '€'; first at key 'label-000000002'")


def test_vocabulary_check_passes_and_reports_long_labels(words, caplog):
    WordDataset(words, check_labels=True)
    assert "1 label(s) longer than 25 characters" in caplog.text
