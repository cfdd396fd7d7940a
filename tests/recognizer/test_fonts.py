"""Fonts of the renderer: sources, families, glyph coverage, and the fixed font-family-disjoint split."""

from __future__ import annotations

import shutil
import string

import pytest
from PIL import ImageFont

from recognizer import fonts
from recognizer.charset import PRINTABLE
from recognizer.vocabulary import KIND_ALPHABETS


@pytest.fixture(scope="module")
def faces() -> tuple[fonts.Face, ...]:
    return fonts.all_faces()


def test_at_least_a_hundred_families_and_both_sides_of_the_split(faces):
    train = fonts.font_set("train", string.ascii_letters)
    held = fonts.font_set("held-out", string.ascii_letters)
    everything = fonts.font_set("all", string.ascii_letters)

    names = {fonts.family_key(n) for n, _ in everything.families}
    assert len(names) >= 100, f"only {len(names)} font families found"
    assert len(train.families) + len(held.families) == len(everything.families)
    assert 0.1 < len(held.families) / len(everything.families) < 0.3
    assert {"package", "python", "system"} <= {f.source for _, fs in everything.families for f in fs}


def test_the_split_shares_no_family_and_is_a_function_of_the_name_only():
    train = {fonts.family_key(n) for n, _ in fonts.font_set("train", string.digits).families}
    held = {fonts.family_key(n) for n, _ in fonts.font_set("held-out", string.digits).families}

    assert train and held and not train & held
    assert all(fonts.is_held_out(n) for n in held) and not any(fonts.is_held_out(n) for n in train)
    # Normalised: spelling and case of a family name do not move it across the split.
    assert fonts.is_held_out("Source Sans Pro") == fonts.is_held_out("sourcesans-pro")
    classic = {"Roboto", "Lato", "Caladea", "Manrope", "Source Sans Pro", "Amatic SC"}
    assert not any(fonts.is_held_out(n) for n in classic)


def test_every_face_used_draws_every_character_of_its_alphabet():
    needed: dict[str, set[str]] = {}  # face path -> the characters of every alphabet it is used for
    for kind, alphabet in KIND_ALPHABETS.items():
        found = fonts.font_set("all", alphabet)
        lacking = [f for f in fonts.all_faces() if not set(alphabet) <= set(f.covered)]
        assert found.skipped == len(lacking)  # what the check skips, it counts
        print(f"{kind}: {len(found.families)} families, {found.skipped} faces skipped for missing glyphs")
        for _, fs in found.families:
            for face in fs:
                needed.setdefault(face.path, set()).update(alphabet)

    for path, chars in needed.items():
        font = ImageFont.truetype(path, 20)
        blank = sorted(c for c in chars if font.getmask(c).getbbox() is None)
        assert not blank, f"{path} draws nothing for {blank}"


def test_a_face_lacking_glyphs_is_skipped_and_counted(faces):
    digits_only = [f for f in faces if set(string.digits) <= set(f.covered) < set(PRINTABLE)]
    assert digits_only, "expected some faces without the full printable set"
    for which in ("train", "held-out"):
        side = [f for f in digits_only if fonts.is_held_out(f.family) == (which == "held-out")]
        used = {f.path for _, fs in fonts.font_set(which, PRINTABLE).families for f in fs}
        assert not used & {f.path for f in side}
    assert fonts.font_set("all", PRINTABLE).skipped >= len(digits_only)


def test_families_are_sorted_and_faces_of_a_family_share_its_name():
    found = fonts.font_set("all", string.ascii_letters)
    keys = [fonts.family_key(n) for n, _ in found.families]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for name, fs in found.families:
        assert {fonts.family_key(f.family) for f in fs} == {fonts.family_key(name)}
        assert [f.path for f in fs] == sorted(f.path for f in fs)


def test_faces_from_a_directory_form_the_dirs_set(tmp_path):
    src = next(f for f in fonts.all_faces() if f.family == "Fredoka One")
    shutil.copy(src.path, tmp_path / "mine.ttf")

    only = fonts.font_set("dirs", string.ascii_letters, (str(tmp_path),))

    assert [n for n, _ in only.families] == ["Fredoka One"]
    assert [f.source for f in only.families[0][1]] == ["dir"]
    with pytest.raises(fonts.FontError, match="does not exist"):
        fonts.all_faces((str(tmp_path / "missing"),))
    with pytest.raises(fonts.FontError, match="unknown font set"):
        fonts.font_set("classic", "abc")
