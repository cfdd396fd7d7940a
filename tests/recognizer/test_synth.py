"""The synthetic word renderer: labels, styles, determinism by seed, output straight to LMDB."""

from __future__ import annotations

import io
import random

import lmdb
import pytest
from PIL import Image

from recognizer.charset import MAX_LABEL_LEN, out_of_vocabulary
from recognizer.lmdb_data import LmdbReader
from recognizer.synth import (
    MAX_WORD_LEN,
    STYLES,
    SynthError,
    font_files,
    render_dataset,
    render_sample,
    render_word,
    sample_digits,
    sample_label,
    sample_word,
    short_words,
)


def _all_items(path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


def test_styles_cover_the_experiments_test_sets():
    assert {"clean", "lowres", "blur", "perspective", "curved", "noisy"} <= set(STYLES)
    assert len(STYLES) == len(set(STYLES)) >= 6


def test_fonts_come_from_the_packages():
    files = font_files()
    assert len(files) >= 9 and all(f.endswith((".ttf", ".otf")) for f in files)
    assert any("Roboto" in f for f in files) and any("AmaticSC" in f for f in files)


def test_labels_are_in_vocabulary_bounded_and_varied():
    rng = random.Random(7)
    labels = [sample_label(rng) for _ in range(2000)]
    assert all(0 < len(label) <= MAX_LABEL_LEN and not out_of_vocabulary(label) for label in labels)
    assert any(label.isdigit() for label in labels)
    assert any(label.isupper() for label in labels) and any(label.islower() for label in labels)
    assert any(not label.isalnum() for label in labels)
    assert len(set(labels)) > 1500


@pytest.mark.parametrize("style", STYLES)
def test_every_style_renders_a_decodable_word_crop(style):
    data, label = render_sample(seed=3, index=5, style=style)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == "RGB"
    min_h, max_h = (12, 20) if style == "lowres" else (16, 400)
    assert min_h <= img.size[1] <= max_h and img.size[0] >= 4
    # Something was drawn: the crop is not one flat colour.
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 40
    assert label


def test_render_word_rejects_an_unknown_style():
    with pytest.raises(SynthError, match="unknown style 'sepia'"):
        render_word("abc", "sepia", random.Random(0))


def test_small_caps_faces_get_upper_case_labels():
    rng = random.Random(1)
    small_caps = next(f for f in font_files() if "AmaticSC" in f)
    assert render_word("Word", "clean", rng, small_caps).mode == "RGB"
    labels = [render_sample(0, i, "clean")[1] for i in range(300)]
    assert any(label.isupper() for label in labels)


def test_render_sample_is_pure():
    assert render_sample(11, 42, "curved") == render_sample(11, 42, "curved")
    assert render_sample(11, 42, "curved") != render_sample(11, 43, "curved")


def test_dataset_is_deterministic_by_seed(tmp_path):
    a = render_dataset(tmp_path / "a", 24, seed=1)
    render_dataset(tmp_path / "b", 24, seed=1, workers=2)
    render_dataset(tmp_path / "c", 24, seed=2)

    assert _all_items(tmp_path / "a") == _all_items(tmp_path / "b")
    assert _all_items(tmp_path / "a") != _all_items(tmp_path / "c")
    assert a["count"] == 24 and a["styles"] == {s: 3 for s in STYLES} and a["bytes"] > 0


def test_dataset_records_labels_and_styles(tmp_path):
    done = []
    render_dataset(tmp_path / "d", 6, seed=5, styles=["blur", "outlined"], progress=done.append)

    reader = LmdbReader(tmp_path / "d")

    assert len(reader) == 6 and done == [1, 2, 3, 4, 5, 6]
    assert [reader.get_style(i) for i in range(6)] == ["blur", "outlined"] * 3
    image, label, style = reader.get(3)
    assert image.mode == "RGB" and style == "outlined"
    assert (reader.get_raw(3)[0], label) == render_sample(5, 3, "outlined")


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(SynthError, match="sepia"):
        render_dataset(tmp_path / "x", 4, seed=0, styles=["clean", "sepia"])
    with pytest.raises(SynthError, match="count"):
        render_dataset(tmp_path / "x", 0, seed=0)
    with pytest.raises(SynthError, match="label kind 'emoji'"):
        render_dataset(tmp_path / "x", 4, seed=0, labels="emoji")
    assert not (tmp_path / "x").exists()


def test_digit_labels_are_digit_strings_of_one_to_eight(tmp_path):
    rng = random.Random(3)
    labels = [sample_digits(rng) for _ in range(2000)]
    assert all(label.isdigit() and 1 <= len(label) <= 8 for label in labels)
    assert {len(label) for label in labels} == set(range(1, 9))
    assert set("".join(labels)) == set("0123456789")

    render_dataset(tmp_path / "d", 8, seed=2, styles=["noisy"], labels="digits")
    reader = LmdbReader(tmp_path / "d")
    assert all(reader.get_label(i).isdigit() for i in range(8))
    assert (reader.get_raw(5)[0], reader.get_label(5)) == render_sample(2, 5, "noisy", labels="digits")
    assert render_sample(2, 5, "noisy", labels="digits") != render_sample(2, 5, "noisy")


def test_word_labels_are_short_dictionary_words_in_varied_case():
    rng = random.Random(5)
    labels = [sample_word(rng) for _ in range(2000)]
    assert all(label.isalpha() and 1 <= len(label) <= MAX_WORD_LEN for label in labels)
    assert {label.lower() for label in labels} <= {w.lower() for w in short_words()}
    kinds = {"upper" if w.isupper() else "title" if w.istitle() else "lower" for w in labels if len(w) > 1}
    assert kinds == {"upper", "title", "lower"}
