"""Backgrounds of the varied renderer: procedural generator kinds, images from a directory, the fixed split.

Generator kinds are split once into those training sees and those held out (BACKGROUND_SPLIT), so a
benchmark row can ask for backgrounds no model was trained on.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from recognizer import styles as fx

Size = tuple[int, int]
# classic: each style family's own (flat, gradient, blotchy texture); train / held-out / all: the
# generator kinds of BACKGROUND_SPLIT; dirs: only crops of the images of the directories named.
BACKGROUND_SETS: tuple[str, ...] = ("classic", "train", "held-out", "all", "dirs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BackgroundError(ValueError):
    """An unknown background set, or a background directory with no image in it."""


def _grey(gen: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return gen.normal(0.0, scale, size=shape).astype(np.float32)


def _tinted(rng: random.Random, shade: np.ndarray) -> Image.Image:
    """A colour image from a ``[h, w]`` shade map around a random base colour."""
    base = np.array(fx.random_color(rng), dtype=np.float32)
    return Image.fromarray(np.clip(base + shade[..., None], 0, 255).astype(np.uint8))


def _value_noise(gen: np.random.Generator, size: Size, octaves: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1] of ``size``: coarse random grids upsampled and summed (fractal)."""
    w, h = size
    total = np.zeros((h, w), dtype=np.float32)
    amp = 1.0
    for octave in range(octaves):
        step = max(2.0, cell / 2**octave)
        grid = gen.uniform(-1, 1, size=(int(h / step) + 2, int(w / step) + 2)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
        total += amp * np.asarray(img)
        amp *= 0.5
    return total / 1.9


def paper(rng: random.Random, size: Size) -> Image.Image:
    """Off-white or tinted paper: fibres (stretched noise), grain and a soft vignette."""
    gen = fx.numpy_rng(rng)
    w, h = size
    fibres = np.asarray(Image.fromarray(_grey(gen, (h, max(1, w // 6)), 1.0), mode="F").resize(size))
    shade = fibres * rng.uniform(4, 12) + _grey(gen, (h, w), rng.uniform(1, 5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade -= rng.uniform(0, 30) * (((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2)
    light = rng.randint(200, 250)
    tint = np.array([light, light - rng.randint(0, 20), light - rng.randint(0, 45)], dtype=np.float32)
    return Image.fromarray(np.clip(tint + shade[..., None], 0, 255).astype(np.uint8))


def noise(rng: random.Random, size: Size) -> Image.Image:
    """Fractal value noise (clouds, stone) around a random colour."""
    gen = fx.numpy_rng(rng)
    shade = _value_noise(gen, size, rng.randint(2, 4), rng.uniform(8, 40)) * rng.uniform(15, 60)
    return _tinted(rng, shade)


def stripes(rng: random.Random, size: Size) -> Image.Image:
    """Ruled or striped paper: parallel lines at a random angle and pitch."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.choice((0.0, math.pi / 2, rng.uniform(0, math.pi)))
    pitch = rng.uniform(4, 20)
    phase = (xx * math.sin(angle) + yy * math.cos(angle)) / pitch
    duty = rng.uniform(0.1, 0.5)
    shade = np.where((phase % 1.0) < duty, 1.0, 0.0).astype(np.float32) * rng.uniform(-50, 50)
    return _tinted(rng, shade)


def speckle(rng: random.Random, size: Size) -> Image.Image:
    """Granite or concrete: dense dark and light specks on a flat or slightly mottled colour."""
    gen = fx.numpy_rng(rng)
    w, h = size
    shade = _grey(gen, (h, w), rng.uniform(4, 12))
    specks = gen.random((h, w)) < rng.uniform(0.02, 0.15)
    shade[specks] += gen.choice([-1.0, 1.0], size=int(specks.sum())) * rng.uniform(30, 90)
    img = _tinted(rng, shade)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def wood(rng: random.Random, size: Size) -> Image.Image:
    """Wood grain: rings of a sine in a noise-distorted coordinate, in brown tones."""
    gen = fx.numpy_rng(rng)
    w, h = size
    yy, _ = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = _value_noise(gen, size, 2, rng.uniform(20, 60)) * rng.uniform(4, 14)
    rings = np.sin((yy + warp) * rng.uniform(0.3, 1.2)) * rng.uniform(10, 35)
    base = np.array([rng.randint(90, 200), rng.randint(50, 130), rng.randint(10, 70)], dtype=np.float32)
    return Image.fromarray(np.clip(base + rings[..., None], 0, 255).astype(np.uint8))


def metal(rng: random.Random, size: Size) -> Image.Image:
    """Brushed metal: horizontal streaks (noise smeared along x) and a sheen band."""
    gen = fx.numpy_rng(rng)
    w, h = size
    streaks = np.asarray(Image.fromarray(_grey(gen, (h, max(1, w // 30)), 12.0), mode="F").resize(size))
    streaks = streaks + _grey(gen, (h, w), 3.0)
    yy = np.arange(h, dtype=np.float32)[:, None]
    sheen = 40.0 * np.exp(-(((yy / h) - rng.uniform(0, 1)) ** 2) / 0.05)
    grey = rng.randint(110, 200)
    return Image.fromarray(np.clip(grey + streaks + sheen, 0, 255).astype(np.uint8)).convert("RGB")


def weave(rng: random.Random, size: Size) -> Image.Image:
    """Cloth: two crossing sets of threads modulated by a checkerboard of over and under."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pitch = rng.uniform(3, 8)
    warp_t, weft_t = np.cos(xx * math.pi / pitch) ** 2, np.cos(yy * math.pi / pitch) ** 2
    over = ((xx // pitch + yy // pitch) % 2).astype(np.float32)
    shade = (over * warp_t + (1 - over) * weft_t - 0.5) * rng.uniform(20, 60)
    return _tinted(rng, shade.astype(np.float32))


def bokeh(rng: random.Random, size: Size) -> Image.Image:
    """An out-of-focus scene: blurred discs of light over a gradient."""
    img = fx.gradient_background(rng, size, spread=80)
    w, h = size
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 12)):
        r = rng.uniform(0.2, 0.8) * h
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fx.random_color(rng))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 0.3) * h))


# The procedural kinds; the split is fixed (never a function of what else is installed).
GENERATORS: dict[str, Callable[[random.Random, Size], Image.Image]] = {
    "solid": fx.solid_background, "gradient": fx.gradient_background, "texture": fx.texture_background,
    "paper": paper, "noise": noise, "stripes": stripes, "speckle": speckle,
    "wood": wood, "metal": metal, "weave": weave, "bokeh": bokeh,
}
BACKGROUND_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("solid", "gradient", "texture", "paper", "noise", "stripes", "speckle"),
    "held-out": ("wood", "metal", "weave", "bokeh"),
}
BACKGROUND_SPLIT["all"] = BACKGROUND_SPLIT["train"] + BACKGROUND_SPLIT["held-out"]


@functools.cache
def image_files(dirs: tuple[str, ...]) -> tuple[str, ...]:
    """Sorted image files under ``dirs``. Raises BackgroundError for a missing or empty directory."""
    found: list[str] = []
    for root in dirs:
        path = Path(root)
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BackgroundError(f"background directory {root} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        found += files
    return tuple(found)


@functools.lru_cache(maxsize=64)
def _image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def image_crop(path: str, rng: random.Random, size: Size) -> Image.Image:
    """A random crop of the image at ``path``, scaled so that it covers ``size``."""
    img = _image(path)
    w, h = size
    scale = max(w / img.width, h / img.height) * rng.uniform(1.0, 2.0)
    cw, ch = min(img.width, math.ceil(w / scale)), min(img.height, math.ceil(h / scale))
    x, y = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
    return img.resize(size, Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))


def background(rng: random.Random, size: Size, which: str, image_dirs: tuple[str, ...] = ()) -> Image.Image:
    """A background of ``size`` from set ``which`` (BACKGROUND_SETS but ``classic``).

    With ``image_dirs``, half the backgrounds of a generator set are crops of their images (all of
    them for ``dirs``).
    """
    if which not in BACKGROUND_SPLIT and which != "dirs":
        raise BackgroundError(f"unknown background set {which!r}; choose from {', '.join(BACKGROUND_SETS)}")
    if which == "dirs" or (image_dirs and rng.random() < 0.5):
        return image_crop(rng.choice(image_files(image_dirs)), rng, size)
    return GENERATORS[rng.choice(BACKGROUND_SPLIT[which])](rng, size)
