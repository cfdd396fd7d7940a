"""The synthetic word renderer: labels, styles, determinism by seed, output straight to LMDB."""

from __future__ import annotations

import io
import random
import shutil

import lmdb
import pytest
from PIL import Image

from recognizer import fonts
from recognizer.charset import MAX_LABEL_LEN, get_alphabet, out_of_vocabulary
from recognizer.lmdb_data import LmdbReader
from recognizer.synth import (
    MAX_WORD_LEN,
    STYLES,
    Sources,
    SynthError,
    font_files,
    long_words,
    render_dataset,
    render_sample,
    render_word,
    sample_digits,
    sample_general,
    sample_label,
    sample_long,
    sample_word,
    short_words,
)
from recognizer.vocabulary import KIND_ALPHABETS


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


# The varied style: font and background sets, directories, new label kinds.

RICH = Sources("train", (), "train", ())


def test_varied_dataset_is_deterministic_by_seed(tmp_path):
    summary = render_dataset(tmp_path / "a", 16, seed=4, styles=["varied"], labels="general", sources=RICH)
    render_dataset(tmp_path / "b", 16, seed=4, styles=["varied"], labels="general", sources=RICH, workers=2)
    render_dataset(tmp_path / "c", 16, seed=5, styles=["varied"], labels="general", sources=RICH)

    assert _all_items(tmp_path / "a") == _all_items(tmp_path / "b")
    assert _all_items(tmp_path / "a") != _all_items(tmp_path / "c")
    assert summary["font_families"] >= 100 and summary["fonts_skipped"] >= 0
    assert render_sample(4, 3, "varied", labels="long", sources=RICH) == \
        render_sample(4, 3, "varied", labels="long", sources=RICH)


@pytest.mark.parametrize("which", ["train", "held-out"])
def test_varied_renders_decodable_crops_from_each_side(which):
    sources = Sources(which, (), which, ())
    for i in range(12):
        data, label = render_sample(9, i, "varied", labels="general", sources=sources)
        img = Image.open(io.BytesIO(data))
        assert img.mode == "RGB" and img.size[0] >= 4 and img.size[1] >= 8 and label


def test_classic_styles_take_the_new_font_and_background_sets():
    held = Sources("held-out", (), "held-out", ())
    assert render_sample(1, 2, "clean", sources=held) != render_sample(1, 2, "clean")
    assert render_sample(1, 2, "clean", sources=held)[1] in {render_sample(1, 2, "clean")[1],
                                                              render_sample(1, 2, "clean")[1].upper()}


def test_backgrounds_from_a_directory_are_used(tmp_path):
    Image.new("RGB", (400, 200), (250, 10, 10)).save(tmp_path / "red.png")
    sources = Sources("train", (), "dirs", (str(tmp_path),))
    summary = render_dataset(tmp_path / "d", 8, seed=1, styles=["clean"], labels="words", sources=sources)
    reader = LmdbReader(tmp_path / "d")

    assert summary["background_images"] == 1
    for i in range(8):
        img = reader.get(i)[0]
        r, g, b = img.getpixel((img.size[0] // 2, 0))  # the top margin is background
        assert r > 180 and g < 90 and b < 90
    with pytest.raises(SynthError, match="holds no image"):
        missing = Sources("train", (), "dirs", (str(tmp_path / "e0"),))
        render_dataset(tmp_path / "e", 2, seed=1, sources=missing)


def test_fonts_from_a_directory_are_used(tmp_path):
    faces = {f.family: f.path for f in fonts.all_faces()}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    shutil.copy(faces["Fredoka One"], tmp_path / "one")
    shutil.copy(faces["Caladea"] if "Caladea" in faces else faces["Lato"], tmp_path / "two")
    one, two = (Sources("dirs", (str(tmp_path / d),), "train", ()) for d in ("one", "two"))

    summary = render_dataset(tmp_path / "d", 4, seed=1, styles=["varied"], labels="words", sources=one)

    assert summary["font_families"] == 1
    assert render_sample(1, 0, "clean", labels="words", sources=one) != \
        render_sample(1, 0, "clean", labels="words", sources=two)
    with pytest.raises(SynthError, match="--font-dir"):
        render_dataset(tmp_path / "e", 2, seed=1, sources=Sources("dirs", (), "train", ()))


def test_general_labels_are_realistic_in_length_form_and_alphabet():
    rng = random.Random(11)
    labels = [sample_general(rng) for _ in range(5000)]
    alnum = get_alphabet("alnum36")

    assert all(0 < len(label) <= MAX_LABEL_LEN for label in labels)
    assert set("".join(labels)) <= set(KIND_ALPHABETS["general"])
    assert max(len(label) for label in labels) > 15
    assert any("-" in label and label.replace("-", "").isalpha() for label in labels)
    assert any("'" in label for label in labels)
    assert any(any(c.isdigit() for c in label) and any(c.isalpha() for c in label) for label in labels)
    assert any(label.isupper() and len(label) > 3 for label in labels)
    assert any(label.istitle() and label.isalpha() and len(label) > 3 for label in labels)
    assert alnum.fold("Don't-Stop42!") == "dontstop42" and alnum.encode("x" * 25)[-1] == 0


def test_long_labels_have_eleven_to_twenty_five_letters():
    rng = random.Random(2)
    labels = [sample_long(rng) for _ in range(3000)]
    assert all(label.isalpha() and 11 <= len(label) <= 25 for label in labels)
    assert max(len(label) for label in labels) > 18
    folded = [get_alphabet("alnum36").fold(label) for label in labels]
    assert all(f == label.lower() for f, label in zip(folded, labels, strict=True))
    assert {label.lower() for label in labels} <= {w.lower() for w in long_words()}
