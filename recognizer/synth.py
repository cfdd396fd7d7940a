"""Synthetic word images: labels, fonts and style families, rendered per sample seed straight to LMDB."""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import multiprocessing
import random
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from recognizer import styles as fx
from recognizer.charset import MAX_LABEL_LEN, out_of_vocabulary
from recognizer.lmdb_data import LmdbWriter

logger = logging.getLogger(__name__)

# Families a sample can be drawn in; the order is part of the output (sample i uses STYLES[i % n]).
STYLES: tuple[str, ...] = ("clean", "rotated", "perspective", "curved", "lowres", "blur", "noisy", "outlined")

# Font packages from pyproject's `recognizer` extra; each ships its faces under <package>/files/.
FONT_PACKAGES: tuple[str, ...] = (
    "font_roboto", "font_source_sans_pro", "font_source_serif_pro", "font_caladea", "font_lato",
    "font_manrope", "font_hanken_grotesk", "font_fredoka_one", "font_amatic_sc",
)
JPEG_QUALITY = 90
SMALL_CAPS_MARK = "AmaticSC"  # faces whose lower case are small capitals
# Variable fonts duplicate the static faces; hairline weights vanish under blur, noise and downscaling.
_SKIPPED_FACES = ("Variable", "Thin", "ExtraLight")


class SynthError(ValueError):
    """The renderer cannot run: unknown style, no fonts, or bad arguments."""


@functools.cache
def font_files() -> tuple[str, ...]:
    """Paths of the faces in FONT_PACKAGES, sorted (``.ttf``, or ``.otf`` where no ``.ttf``; no hairlines)."""
    found: list[str] = []
    for package in FONT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            logger.warning("font package %s is not installed", package)
            continue
        files = Path(next(iter(spec.submodule_search_locations))) / "files"
        faces = sorted(files.glob("*.ttf")) or sorted(files.glob("*.otf"))
        found += [str(p) for p in faces if not any(mark in p.name for mark in _SKIPPED_FACES)]
    if not found:
        raise SynthError(f"no fonts found in any of {', '.join(FONT_PACKAGES)}")
    return tuple(found)


@functools.lru_cache(maxsize=4096)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.cache
def dictionary_words() -> tuple[str, ...]:
    """Sorted English words (web2 list) that the vocabulary can spell, at most MAX_LABEL_LEN long."""
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=False)
    return tuple(sorted(w for w in words if 0 < len(w) <= MAX_LABEL_LEN and not out_of_vocabulary(w)))


def _number(rng: random.Random) -> str:
    n = rng.randrange(10 ** rng.randint(1, 6))
    form = rng.randrange(8)
    if form == 0:
        return f"${n % 1000}.{rng.randrange(100):02d}"
    if form == 1:
        return f"{rng.randrange(24)}:{rng.randrange(60):02d}"
    if form == 2:
        return f"{n % 101}%"
    if form == 3:
        return f"{n:,}"
    if form == 4:
        return f"{rng.randrange(100, 1000)}-{rng.randrange(10000):04d}"
    return str(n)


def sample_label(rng: random.Random) -> str:
    """A random label: mostly dictionary words in varied case, plus codes, numbers and punctuation.

    Every label is non-empty, in the vocabulary and at most MAX_LABEL_LEN characters.
    """
    kind = rng.random()
    if kind < 0.12:  # random alphanumeric code
        alphabet = rng.choice((string.ascii_uppercase + string.digits, string.ascii_letters + string.digits))
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
    if kind < 0.24:
        return _number(rng)
    word = rng.choice(dictionary_words())
    case = rng.random()
    if case < 0.15:
        word = word.upper()
    elif case < 0.35:
        word = word.capitalize()
    elif case < 0.55:
        word = word.lower()
    if kind < 0.32:  # word with punctuation
        pattern = rng.choice(("{}.", "{}!", "{}'s", "({})", "{},", "{}?", '"{}"', "#{}", "{}-{}", "{}&{}"))
        joined = pattern.format(word, rng.choice(dictionary_words()).lower())  # extra args are ignored
        if len(joined) <= MAX_LABEL_LEN:
            word = joined
    return word


def sample_digits(rng: random.Random) -> str:
    """A string of 1 to 8 digits, uniformly random (house numbers, prices, codes: no language model helps)."""
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 8)))


# Longest dictionary word of the ``words`` label kind: most scene-text words are far shorter.
MAX_WORD_LEN = 10


@functools.cache
def short_words() -> tuple[str, ...]:
    """Dictionary words of letters only, 1 to MAX_WORD_LEN long (sorted, as dictionary_words)."""
    return tuple(w for w in dictionary_words() if len(w) <= MAX_WORD_LEN and w.isalpha())


def sample_word(rng: random.Random) -> str:
    """A dictionary word of 1 to MAX_WORD_LEN letters: 20% upper case, 30% capitalized, 50% lower."""
    word = rng.choice(short_words())
    case = rng.random()
    if case < 0.2:
        return word.upper()
    return word.capitalize() if case < 0.5 else word.lower()


# What a data set's labels are drawn from: the default mix, dictionary words, or digit strings.
LABEL_KINDS: dict[str, Callable[[random.Random], str]] = {
    "mixed": sample_label, "words": sample_word, "digits": sample_digits,
}


def _text_masks(label: str, style: str, rng: random.Random, font_path: str) -> list[Image.Image]:
    """Grey-level masks of ``label`` (with the outline as a second, wider mask for ``outlined``)."""
    height = rng.randint(32, 64)
    font = _font(font_path, max(8, round(height * rng.uniform(0.8, 1.05))))
    stroke = rng.randint(1, max(1, font.size // 12)) if style == "outlined" else 0
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


def _warp(masks: list[Image.Image], style: str, rng: random.Random) -> list[Image.Image]:
    warp = {"rotated": fx.rotate, "perspective": fx.perspective, "curved": fx.curve}.get(style)
    if warp is None:
        return masks
    if len(masks) == 1:
        return [warp(masks[0], rng)]
    # Warp outline and fill together (as bands of one image) so they stay aligned.
    bands = warp(Image.merge("RGB", (masks[0], masks[1], masks[1])), rng).split()
    return [bands[0], bands[1]]


def _background(style: str, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    pick = rng.random()
    if style == "clean":
        return fx.solid_background(rng, size) if pick < 0.7 else fx.gradient_background(rng, size, spread=25)
    if style == "noisy" or (style == "outlined" and pick < 0.5):
        return fx.texture_background(rng, size)
    if pick < 0.45:
        return fx.solid_background(rng, size)
    return fx.gradient_background(rng, size) if pick < 0.8 else fx.texture_background(rng, size)


def render_word(label: str, style: str, rng: random.Random, font_path: str | None = None) -> Image.Image:
    """Render ``label`` as an RGB word crop in style family ``style``, drawing all randomness from ``rng``.

    ``font_path`` defaults to a face drawn from ``font_files()``.
    """
    if style not in STYLES:
        raise SynthError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    font_path = font_path or rng.choice(font_files())
    masks = _warp(_text_masks(label, style, rng, font_path), style, rng)
    box = masks[0].getbbox() or (0, 0, *masks[0].size)
    masks = [m.crop(box) for m in masks]
    w, h = masks[0].size
    mx, my = (round(h * rng.uniform(0.02, 0.25)) for _ in range(2))
    mx2, my2 = (round(h * rng.uniform(0.02, 0.25)) for _ in range(2))
    img = _background(style, rng, (w + mx + mx2, h + my + my2))
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


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample ``index`` under ``seed``: independent of every other sample's."""
    return random.Random(f"fedocr-synth/{seed}/{index}")


def render_sample(
    seed: int, index: int, style: str, quality: int = JPEG_QUALITY, labels: str = "mixed"
) -> tuple[bytes, str]:
    """JPEG bytes and label of sample ``index`` of the data set with ``seed`` (pure: same in, same out).

    ``labels`` picks the label kind (``LABEL_KINDS``).
    """
    rng = sample_rng(seed, index)
    label = LABEL_KINDS[labels](rng)
    font_path = rng.choice(font_files())
    if SMALL_CAPS_MARK in Path(font_path).name:
        label = label.upper()  # a small-caps face draws every letter as a capital; label what is seen
    img = render_word(label, style, rng, font_path)
    if style == "lowres":
        quality = min(quality, rng.randint(40, 80))  # small crops usually come heavily compressed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), label


def _render_job(job: tuple[int, int, str, int, str]) -> tuple[bytes, str, str]:
    seed, index, style, quality, labels = job
    return (*render_sample(seed, index, style, quality, labels), style)


def render_dataset(
    out: Path,
    count: int,
    seed: int,
    styles: Sequence[str] | None = None,
    *,
    workers: int = 1,
    quality: int = JPEG_QUALITY,
    labels: str = "mixed",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Render ``count`` word images to a new LMDB at ``out``; sample i uses ``styles[i % len(styles)]``.

    The same ``seed`` and ``styles`` give byte-identical content whatever ``workers`` is; sample i
    of two sets with one seed has the same label whatever the style. ``workers`` > 1 renders in
    forked processes. ``labels`` picks the label kind (``LABEL_KINDS``: ``mixed``, ``words`` or ``digits``).
    ``progress``, if given, is called with the number of samples written so far.

    Returns:
        A summary: path, count, seed, per-style counts, image bytes, seconds and images per second.

    Raises:
        SynthError: ``count`` < 1, ``workers`` < 1 or an unknown style.
        DatasetError: ``out`` already holds an LMDB and ``overwrite`` is false.
    """
    styles = tuple(STYLES if styles is None else styles)
    unknown = [s for s in styles if s not in STYLES]
    if not styles or unknown:
        raise SynthError(f"unknown or no styles {unknown or list(styles)}; choose from {', '.join(STYLES)}")
    if labels not in LABEL_KINDS:
        raise SynthError(f"unknown label kind {labels!r}; choose from {', '.join(LABEL_KINDS)}")
    if count < 1 or workers < 1:
        raise SynthError(f"count and workers must be >= 1, got count={count}, workers={workers}")
    font_files(), dictionary_words(), short_words()  # load once before any fork
    jobs = ((seed, i, styles[i % len(styles)], quality, labels) for i in range(count))
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
    }
