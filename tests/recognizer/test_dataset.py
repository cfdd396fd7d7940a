"""WordDataset tensors and targets folded to the alphabet, the loader's batches, and the label report."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from recognizer import charset
from recognizer.dataset import WordDataset, label_report, make_loader
from recognizer.lmdb_data import LmdbReader, LmdbWriter

ALNUM = charset.get_alphabet("alnum36")
PRINTABLE = charset.get_alphabet("printable94")

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
    # The default alphabet folds case: "Ab1" is read as "ab1" (ids from 2: digits, then letters).
    assert target.tolist() == [12, 13, 3, charset.EOS] + [charset.PAD] * 4
    assert ALNUM.decode(target.tolist()) == "ab1"


def test_targets_follow_the_alphabet(words):
    _, target, label = WordDataset(words, input_hw=(32, 100), max_len=8, alphabet="printable94")[0]
    assert label == "Ab1" and PRINTABLE.decode(target.tolist()) == "Ab1"
    _, target, _ = WordDataset(words, input_hw=(32, 100), max_len=8)[4]
    assert ALNUM.decode(target.tolist()) == "end"  # the full stop is outside alnum36 and dropped


def test_long_label_is_cut_to_max_len_and_kept_whole_in_the_label(words):
    _, target, label = WordDataset(words, max_len=charset.MAX_SEQ_LEN)[3]
    assert label == "x" * 30
    assert target.shape == (26,) and target[-1].item() == charset.EOS
    assert ALNUM.decode(target.tolist()) == "x" * 25


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
    assert targets[0].tolist() == ALNUM.encode("Ab1") + [charset.PAD] * 2
    assert targets[1, -1] == charset.EOS
    assert labels == ["Ab1", "hello"] and batches[-1][2] == ["end."]
    assert len(list(make_loader(words, batch_size=2, shuffle=False, drop_last=True))) == 2


def test_shuffle_is_fixed_by_seed(words):
    def order(seed):
        return [label for _, _, labels in make_loader(words, 1, shuffle=True, seed=seed) for label in labels]

    assert order(4) == order(4) and sorted(order(4)) == sorted(LABELS)
    assert any(order(4) != order(s) for s in range(5, 10))


def test_take_draws_a_seeded_sample_of_each_pooled_set(words, tmp_path):
    more = tmp_path / "more"
    with LmdbWriter(more) as writer:
        for i in range(40):
            writer.add(_png((24, 16), (0, 6 * i, 0)), f"w{i}")

    def pooled(seed):
        loader = make_loader([words, more], 4, shuffle=True, seed=seed, take=[None, 10])
        return [label for _, _, batch in loader for label in batch]

    first = pooled(3)
    assert sorted(x for x in first if not x.startswith("w")) == sorted(LABELS)  # all of the first set
    drawn = {x for x in first if x.startswith("w")}
    assert len(drawn) == 10 and len(first) == len(LABELS) + 10
    assert pooled(3) == first  # the same seed, the same draw and order
    assert any({x for x in pooled(s) if x.startswith("w")} != drawn for s in range(4, 8))
    with pytest.raises(ValueError, match="take names 1 counts for 2 datasets"):
        make_loader([words, more], 4, shuffle=True, take=[3])


def test_workers_open_their_own_environment(words):
    loader = make_loader(words, batch_size=2, shuffle=False, workers=2)
    loader.dataset[0]  # the parent holds the LMDB open when the workers fork

    labels = [label for _, _, batch in loader for label in batch]

    assert labels == LABELS


def test_label_report_counts_what_folding_drops_and_never_refuses(tmp_path, caplog):
    with LmdbWriter(tmp_path / "any") as writer:
        for label in ["fine", "Café", "OK", "naïve €", "!!", "x" * 30]:
            writer.add(_png((8, 8), (0, 0, 0)), label)
    reader = LmdbReader(tmp_path / "any")

    report = label_report(reader, ALNUM, max_len=charset.MAX_SEQ_LEN)

    # "Café" loses é; "naïve €" loses ï, the space and €; "!!" loses both and is left empty.
    assert (report.labels, report.folded, report.dropped_chars, report.emptied) == (6, 3, 6, 1)
    assert report.too_long == 1 and "3 lose characters outside alnum36" in caplog.text
    kept_case = label_report(reader, PRINTABLE)  # keeps "!!"; still drops é, ï, € and the space
    assert (kept_case.folded, kept_case.dropped_chars, kept_case.emptied) == (2, 4, 0)
    ds = WordDataset(tmp_path / "any", check_labels=True)
    assert ds.label_report == report
    assert ALNUM.decode(ds[1][1].tolist()) == "caf" and ALNUM.decode(ds[4][1].tolist()) == ""
