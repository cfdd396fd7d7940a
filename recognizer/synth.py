"""Synthetic word images: labels, font and background sets, style families, rendered per sample seed to LMDB.

The ``recognizer synth`` options (names kept stable for the benchmarks that render held-out rows):
    --out X --count N --seed S
    --labels {mixed,words,digits,general,long}   label kind (vocabulary.LABEL_KINDS)
    --styles S[,S...]                            classic families (default: all eight) or ``varied``
    --fonts {classic,train,held-out,all,dirs}    font set (fonts.FONT_SETS; default classic)
    --font-dir DIR (repeatable)                  more .ttf/.otf faces (``dirs``: only these)
    --backgrounds {classic,train,held-out,all,dirs}  background set (backgrounds.BACKGROUND_SETS)
    --background-dir DIR (repeatable)            images to crop backgrounds from (``dirs``: only these)
The defaults (``classic`` fonts and backgrounds, the eight classic styles) render what they always did,
byte for byte. ``--styles varied --labels general --fonts train --backgrounds train`` is the rich
training mode: about 130 font families, eleven background kinds split 7/4, and every text effect.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from recognizer import backgrounds as bg
from recognizer import effects
from recognizer import styles as fx
from recognizer.fonts import FONT_PACKAGES, FONT_SETS, SMALL_CAPS_MARK, FontError, font_files, font_set
from recognizer.lmdb_data import LmdbWriter
from recognizer.vocabulary import (
    KIND_ALPHABETS,
    LABEL_KINDS,
    MAX_WORD_LEN,
    dictionary_words,
    long_words,
    sample_digits,
    sample_general,
    sample_label,
    sample_long,
    sample_word,
    short_words,
)

__all__ = [
    "FONT_PACKAGES", "LABEL_KINDS", "MAX_WORD_LEN", "SMALL_CAPS_MARK", "STYLES", "VARIED", "Sources",
    "SynthError", "dictionary_words", "font_files", "long_words", "render_dataset", "render_sample",
    "render_word", "sample_digits", "sample_general", "sample_label", "sample_long", "sample_rng",
    "sample_word", "short_words",
]

logger = logging.getLogger(__name__)

# Families a sample can be drawn in; the order is part of the output (sample i uses STYLES[i % n]).
STYLES: tuple[str, ...] = ("clean", "rotated", "perspective", "curved", "lowres", "blur", "noisy", "outlined")
# The rich family: any font of the set, any background, every text effect at random (effects.py).
# Not in STYLES, so the default output stays what it was.
VARIED = "varied"
ALL_STYLES: tuple[str, ...] = (*STYLES, VARIED)
JPEG_QUALITY = 90


class SynthError(ValueError):
    """The renderer cannot run: unknown style, label kind, font or background set, or bad arguments."""


@dataclass(frozen=True)
class Sources:
    """Where a data set's fonts and backgrounds come from (``classic``: the renderer's original ones)."""

    fonts: str = "classic"
    font_dirs: tuple[str, ...] = ()
    backgrounds: str = "classic"
    background_dirs: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise SynthError for an unknown set, or a ``dirs`` set without directories."""
        if self.fonts not in FONT_SETS or self.backgrounds not in bg.BACKGROUND_SETS:
            raise SynthError(f"unknown font set {self.fonts!r} or background set {self.backgrounds!r}; "
                             f"choose from {', '.join(FONT_SETS)}, and {', '.join(bg.BACKGROUND_SETS)}")
        no_dirs = (self.fonts == "dirs" and not self.font_dirs)
        if no_dirs or (self.backgrounds == "dirs" and not self.background_dirs):
            raise SynthError("the 'dirs' font or background set needs --font-dir or --background-dir")


CLASSIC = Sources()


@functools.lru_cache(maxsize=4096)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _masks(label: str, font: ImageFont.FreeTypeFont, stroke: int) -> list[Image.Image]:
    """Grey-level masks of ``label`` (with the outline as a first, wider mask when ``stroke`` > 0)."""
    # Draw on a canvas that should hold the text and crop after: cheaper than laying the text out
    # twice (font.getbbox, then draw.text). A canvas the ink touches is too small: retry wider.
    ascent, descent = font.getmetrics()
    pad = stroke + font.size // 3 + 2  # room for italic overhang and strokes
    per_char = 1.2
    while True:
        size = (round(font.size * (per_char * len(label) + 1)) + 2 * pad, ascent + descent + 2 * pad)
        masks = [_draw(label, font, size, pad, 0)]
        if stroke:
            masks.insert(0, _draw(label, font, size, pad, stroke))
        box = masks[0].getbbox() or (1, 1, 2, 2)
        if (box[0] > 0 and box[1] > 0 and box[2] < size[0] and box[3] < size[1]) or per_char > 10:
            break
        per_char *= 2
    box = (max(0, box[0] - 2), max(0, box[1] - 2), min(size[0], box[2] + 2), min(size[1], box[3] + 2))
    return [m.crop(box) for m in masks]


def _draw(
    label: str, font: ImageFont.FreeTypeFont, size: tuple[int, int], pad: int, stroke: int
) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).text((pad, pad), label, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return mask


def _text_masks(label: str, style: str, rng: random.Random, font_path: str) -> list[Image.Image]:
    height = rng.randint(32, 64)
    font = _font(font_path, max(8, round(height * rng.uniform(0.8, 1.05))))
    stroke = rng.randint(1, max(1, font.size // 12)) if style == "outlined" else 0
    return _masks(label, font, stroke)


Warp = Callable[[Image.Image, random.Random], Image.Image]


def _warp(masks: list[Image.Image], warp: Warp | None, rng: random.Random) -> list[Image.Image]:
    if warp is None:
        return masks
    if len(masks) == 1:
        return [warp(masks[0], rng)]
    # Warp outline and fill together (as bands of one image) so they stay aligned.
    bands = warp(Image.merge("RGB", (masks[0], masks[1], masks[1])), rng).split()
    return [bands[0], bands[1]]


def _crop_to_ink(masks: list[Image.Image]) -> list[Image.Image]:
    box = masks[0].getbbox() or (0, 0, *masks[0].size)
    return [m.crop(box) for m in masks]


def _background(style: str, rng: random.Random, size: tuple[int, int], sources: Sources) -> Image.Image:
    if sources.backgrounds != "classic":
        return bg.background(rng, size, sources.backgrounds, sources.background_dirs)
    pick = rng.random()
    if style == "clean":
        return fx.solid_background(rng, size) if pick < 0.7 else fx.gradient_background(rng, size, spread=25)
    if style == "noisy" or (style == "outlined" and pick < 0.5):
        return fx.texture_background(rng, size)
    if pick < 0.45:
        return fx.solid_background(rng, size)
    return fx.gradient_background(rng, size) if pick < 0.8 else fx.texture_background(rng, size)


def _render_classic(
    label: str, style: str, rng: random.Random, font_path: str, sources: Sources
) -> Image.Image:
    warp = {"rotated": fx.rotate, "perspective": fx.perspective, "curved": fx.curve}.get(style)
    masks = _crop_to_ink(_warp(_text_masks(label, style, rng, font_path), warp, rng))
    w, h = masks[0].size
    mx, my = (round(h * rng.uniform(0.02, 0.25)) for _ in range(2))
    mx2, my2 = (round(h * rng.uniform(0.02, 0.25)) for _ in range(2))
    img = _background(style, rng, (w + mx + mx2, h + my + my2), sources)
    corner = (mx, my, mx + w, my + h)
    bg_color = img.getpixel((img.size[0] // 2, img.size[1] // 2))
    color = fx.contrasting_color(rng, bg_color, 120.0 if style == "clean" else 80.0)
    if len(masks) == 2:
        outline = fx.contrasting_color(rng, color, 90.0)
        img.paste(outline, corner, masks[0])
    img.paste(color, corner, masks[-1])
    if style == "blur":
        img = fx.blur(img, rng)
    elif style == "noisy":
        img = fx.add_noise(img, rng)
    elif style == "lowres":
        img = fx.downscale(img, rng)
    return img


def _render_varied(label: str, rng: random.Random, font_path: str, sources: Sources) -> Image.Image:
    draw = effects.draw_effects(rng)
    height = rng.randint(28, 72)
    font = _font(font_path, max(8, round(height * rng.uniform(0.8, 1.05))))
    stroke = rng.randint(1, max(1, font.size // 10)) if draw["border"] else 0
    masks = _crop_to_ink(_warp(_masks(label, font, stroke), effects.pick_warp(rng), rng))
    w, h = masks[0].size
    left, top, right, bottom = effects.crop_margins(rng, h)
    size = (max(4, w + left + right), max(8, h + top + bottom))
    backgrounds = sources.backgrounds if sources.backgrounds != "classic" else "train"
    img = bg.background(rng, size, backgrounds, sources.background_dirs)
    under = np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    color = fx.contrasting_color(rng, tuple(int(c) for c in under), rng.uniform(80.0, 140.0))
    corner = (left, top)
    if draw["shadow"]:
        effects.shadow(img, masks[-1], corner, rng)
    if stroke:
        img.paste(fx.contrasting_color(rng, color, 90.0), corner, masks[0])
    img.paste(color, corner, effects.blend(masks[-1], rng) if draw["blend"] else masks[-1])
    return effects.degrade(img, rng, draw)


def render_word(
    label: str, style: str, rng: random.Random, font_path: str | None = None, sources: Sources = CLASSIC
) -> Image.Image:
    """Render ``label`` as an RGB word crop in style family ``style``, drawing all randomness from ``rng``.

    ``font_path`` defaults to a face drawn from ``font_files()``; ``sources`` names the background set.
    """
    if style not in ALL_STYLES:
        raise SynthError(f"unknown style {style!r}; choose from {', '.join(ALL_STYLES)}")
    font_path = font_path or rng.choice(font_files())
    if style == VARIED:
        return _render_varied(label, rng, font_path, sources)
    return _render_classic(label, style, rng, font_path, sources)


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample ``index`` under ``seed``: independent of every other sample's."""
    return random.Random(f"fedocr-synth/{seed}/{index}")


def _pick_font(rng: random.Random, labels: str, sources: Sources) -> tuple[str, bool]:
    """(face path, whether its letters are all capitals) for one sample."""
    if sources.fonts == "classic":
        path = rng.choice(font_files())
        return path, SMALL_CAPS_MARK in Path(path).name
    try:
        families = font_set(sources.fonts, KIND_ALPHABETS[labels], sources.font_dirs).families
    except FontError as exc:
        raise SynthError(str(exc)) from exc
    face = rng.choice(rng.choice(families)[1])  # families uniformly, then one of its faces
    return face.path, face.caps_only


def render_sample(
    seed: int, index: int, style: str, quality: int = JPEG_QUALITY, labels: str = "mixed",
    sources: Sources = CLASSIC,
) -> tuple[bytes, str]:
    """JPEG bytes and label of sample ``index`` of the data set with ``seed`` (pure: same in, same out).

    ``labels`` picks the label kind (``LABEL_KINDS``); ``sources`` the font and background sets.
    """
    rng = sample_rng(seed, index)
    label = LABEL_KINDS[labels](rng)
    font_path, caps_only = _pick_font(rng, labels, sources)
    if caps_only:
        label = label.upper()  # a small-caps face draws every letter as a capital; label what is seen
    img = render_word(label, style, rng, font_path, sources)
    if style == "lowres":
        quality = min(quality, rng.randint(40, 80))  # small crops usually come heavily compressed
    return fx.jpeg_bytes(img, quality), label


def _render_job(job: tuple[int, int, str, int, str, Sources]) -> tuple[bytes, str, str]:
    seed, index, style, quality, labels, sources = job
    return (*render_sample(seed, index, style, quality, labels, sources), style)


def render_dataset(
    out: Path,
    count: int,
    seed: int,
    styles: Sequence[str] | None = None,
    *,
    workers: int = 1,
    quality: int = JPEG_QUALITY,
    labels: str = "mixed",
    sources: Sources = CLASSIC,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Render ``count`` word images to a new LMDB at ``out``; sample i uses ``styles[i % len(styles)]``.

    The same ``seed``, ``styles`` and ``sources`` give byte-identical content whatever ``workers`` is;
    sample i of two sets with one seed has the same label whatever the style. ``workers`` > 1 renders
    in forked processes. ``labels`` picks the label kind (``LABEL_KINDS``); ``sources`` the font and
    background sets. ``progress``, if given, is called with the number of samples written so far.

    Returns:
        A summary: path, count, seed, per-style counts, image bytes, seconds and images per second,
        and for a font set other than ``classic`` its family count and the faces skipped for glyphs.

    Raises:
        SynthError: ``count`` < 1, ``workers`` < 1, an unknown style, label kind, font or background set.
        DatasetError: ``out`` already holds an LMDB and ``overwrite`` is false.
    """
    styles = tuple(STYLES if styles is None else styles)
    unknown = [s for s in styles if s not in ALL_STYLES]
    if not styles or unknown:
        names = ", ".join(ALL_STYLES)
        raise SynthError(f"unknown or no styles {unknown or list(styles)}; choose from {names}")
    if labels not in LABEL_KINDS:
        raise SynthError(f"unknown label kind {labels!r}; choose from {', '.join(LABEL_KINDS)}")
    if count < 1 or workers < 1:
        raise SynthError(f"count and workers must be >= 1, got count={count}, workers={workers}")
    sources.check()
    extra = _load(labels, sources)  # once, before any fork
    jobs = ((seed, i, styles[i % len(styles)], quality, labels, sources) for i in range(count))
    start = time.perf_counter()
    total_bytes, per_style = 0, Counter()
    with LmdbWriter(Path(out), overwrite=overwrite) as writer:
        if workers == 1:
            results = map(_render_job, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_render_job, jobs, chunksize=64)  # imap keeps sample order
        try:
            for image, label, style in results:
                writer.add(image, label, style)
                total_bytes += len(image)
                per_style[style] += 1
                if progress is not None:
                    progress(writer.count)
        finally:
            if pool is not None:
                pool.terminate()
    seconds = time.perf_counter() - start
    logger.info("rendered %d images to %s in %.1f s", count, out, seconds)
    return {
        "path": str(out), "count": count, "seed": seed, "styles": dict(per_style),
        "bytes": total_bytes, "seconds": seconds, "images_per_s": count / seconds if seconds else 0.0,
        **extra,
    }


def _load(labels: str, sources: Sources) -> dict:
    """Load the word lists, fonts and background images a data set needs; their counts for the summary."""
    font_files(), dictionary_words(), short_words(), long_words()
    extra: dict = {}
    try:
        if sources.fonts != "classic":
            found = font_set(sources.fonts, KIND_ALPHABETS[labels], sources.font_dirs)
            extra.update(font_set=sources.fonts, font_families=len(found.families),
                         fonts_skipped=found.skipped)
        if sources.background_dirs:
            extra["background_images"] = len(bg.image_files(sources.background_dirs))
    except (FontError, bg.BackgroundError) as exc:
        raise SynthError(str(exc)) from exc
    return extra
