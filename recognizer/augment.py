"""Training-time augmentation of word images: the STRAug families (Atienza 2021) as N ops at magnitude M.

Every op takes a uint8 ``[H, W, 3]`` array at the model's input size, a level in ``[0, 1]`` and a
numpy generator, and returns a new uint8 array of the same shape. Level 1 is the strongest
setting a person still reads at a glance on a 32-pixel-high crop (STRAug's third level, scaled
to this height); ``augment`` draws each op's level in ``[M/2, M]``, RandAugment-like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from recognizer.styles import jpeg_roundtrip

Op = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
_BILINEAR = Image.Resampling.BILINEAR
_BOX = Image.Resampling.BOX


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _pil(img: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.asarray(fn(Image.fromarray(img)).convert("RGB"), dtype=np.uint8)


def _border(img: np.ndarray) -> tuple[int, int, int]:
    """The median colour of the outermost rows and columns: the background a warp fills in with."""
    ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return tuple(int(c) for c in np.median(ring, axis=0))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """float32 ``[H, W]`` in about [-1, 1]: uniform noise on a coarse grid, upsampled bilinearly."""
    coarse = rng.uniform(-1.0, 1.0, size=cells).astype(np.float32)
    return np.array(Image.fromarray(coarse).resize(shape[::-1], _BILINEAR), dtype=np.float32)


def _remap(img: np.ndarray, src_x: np.ndarray, src_y: np.ndarray) -> np.ndarray:
    """Bilinear sampling of ``img`` at float coordinates ``[H, W]``; outside it, the border colour."""
    h, w = img.shape[:2]
    outside = (src_x < -0.5) | (src_x > w - 0.5) | (src_y < -0.5) | (src_y > h - 0.5)
    x = np.clip(src_x, 0, w - 1)
    y = np.clip(src_y, 0, h - 1)
    x0, y0 = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    f = img.astype(np.float32)
    out = (f[y0, x0] * (1 - fx) + f[y0, x1] * fx) * (1 - fy) + (f[y1, x0] * (1 - fx) + f[y1, x1] * fx) * fy
    out[outside] = _border(img)
    return _u8(out)


def _grid(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``img`` filtered by a small normalized ``kernel`` (edges replicated): a sum of shifted copies."""
    kh, kw = kernel.shape
    h, w = img.shape[:2]
    padded = np.pad(img.astype(np.float32), ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode="edge")
    out = np.zeros(img.shape, dtype=np.float32)
    for dy, dx in zip(*np.nonzero(kernel), strict=True):
        out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return _u8(out / kernel.sum())


# Warp: the text's baseline and spacing bend (STRAug Curve, Distort, Stretch).
def curve(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Bend the text along an arc: columns shift vertically by up to 0.25 H at the ends."""
    h, w = img.shape[:2]
    xs, ys = _grid(img)
    amp = 0.25 * h * level * rng.choice((-1.0, 1.0))
    return _remap(img, xs, ys + amp * ((2 * xs / max(w - 1, 1) - 1) ** 2 - 0.5))


def distort(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Move a coarse grid of points (3 rows, a column per character) by up to 0.1 H, warp between."""
    h, w = img.shape[:2]
    xs, ys = _grid(img)
    cells = (3, max(3, 2 + w // h))
    amp = 0.1 * h * level
    dx, dy = (amp * _smooth_field(rng, (h, w), cells) for _ in range(2))
    return _remap(img, xs + dx, ys + dy)


def stretch(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Widen some stretches of the word and narrow others (five segments, each 0.5..1.5x at level 1)."""
    h, w = img.shape[:2]
    widths = 1.0 + 0.5 * level * rng.uniform(-1.0, 1.0, size=5)
    edges_out = np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum() * (w - 1)
    edges_in = np.linspace(0.0, w - 1, 6)
    xs, ys = _grid(img)
    return _remap(img, np.interp(xs, edges_out, edges_in).astype(np.float32), ys)


# Geometry: the whole crop turns, tilts or shrinks (STRAug Rotate, Perspective, Shrink).
def rotate(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by up to 12 degrees either way, the corners kept (expanded), then resized back."""
    h, w = img.shape[:2]
    angle = 12.0 * level * rng.choice((-1.0, 1.0))
    fill = _border(img)
    return _pil(img, lambda im: im.rotate(angle, _BILINEAR, expand=True, fillcolor=fill).resize((w, h)))


def perspective(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """View the crop from one side: each corner moves by up to 0.2 H vertically and 0.04 W sideways."""
    h, w = img.shape[:2]
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    moved = corners + level * rng.uniform(-1, 1, size=(4, 2)) * np.array([0.04 * w, 0.2 * h])
    # Homography from output points (moved) to input points (corners).
    rows, rhs = [], []
    for (x, y), (u, v) in zip(moved, corners, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    a, b, c, d, e, f, g, k = np.linalg.solve(np.array(rows), np.array(rhs))
    xs, ys = _grid(img)
    den = g * xs + k * ys + 1.0
    return _remap(img, (a * xs + b * ys + c) / den, (d * xs + e * ys + f) / den)


def shrink(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Shrink the crop to 1 - 0.3 level of its size and place it at random on its border colour."""
    h, w = img.shape[:2]
    scale = 1.0 - 0.3 * level
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.empty_like(img)
    out[:] = _border(img)
    x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
    out[y0:y0 + sh, x0:x0 + sw] = _pil(img, lambda im: im.resize((sw, sh), _BILINEAR))
    return out


# Noise (STRAug GaussianNoise, ShotNoise, ImpulseNoise, SpeckleNoise); values in [0, 1] units.
def gaussian_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of standard deviation 0.03..0.13."""
    return _u8(img + 255.0 * rng.normal(0.0, 0.03 + 0.1 * level, size=img.shape))


def shot_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Photon noise: Poisson counts of img x c, c from 60 down to 12 photons at full brightness."""
    c = 60.0 - 48.0 * level
    return _u8(rng.poisson(img / 255.0 * c) / c * 255.0)


def impulse_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on 1..7% of the pixels."""
    out = img.copy()
    hit = rng.random(img.shape[:2]) < 0.01 + 0.06 * level
    out[hit] = rng.choice(np.array([0, 255], dtype=np.uint8), size=(int(hit.sum()), 1))
    return out


def speckle_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise: img x (1 + N(0, 0.1..0.35))."""
    return _u8(img * (1.0 + rng.normal(0.0, 0.1 + 0.25 * level, size=img.shape)))


# Blur (STRAug GaussianBlur, DefocusBlur, MotionBlur, GlassBlur, ZoomBlur).
def gaussian_blur(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of radius 0.3..1.2 pixels (at 32 pixels high)."""
    radius = (0.3 + 0.9 * level) * img.shape[0] / 32
    return _pil(img, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


def defocus_blur(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A lens out of focus: the mean over a disk of radius 1..2 pixels."""
    r = 1.0 + level
    n = int(r)
    ys, xs = np.mgrid[-n:n + 1, -n:n + 1]
    return _convolve(img, (xs**2 + ys**2 <= r * r + 0.25).astype(np.float32))


def motion_blur(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """The camera moved: the mean along a line of 3..7 pixels at a random angle."""
    length = 3 + 2 * round(2 * level)
    theta = rng.uniform(0, np.pi)
    kernel = np.zeros((length, length), dtype=np.float32)
    t = np.linspace(-(length // 2), length // 2, 4 * length)
    rows, cols = (np.rint(length // 2 + t * trig(theta)).astype(int) for trig in (np.sin, np.cos))
    kernel[rows, cols] = 1
    return _convolve(img, kernel)


def glass_blur(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: a blur of radius 0.3..0.6, then each pixel taken from a neighbour at most 1 away."""
    h, w = img.shape[:2]
    d = 1  # two pixels scramble strokes of a 32-pixel-high word beyond reading
    soft = _pil(img, lambda im: im.filter(ImageFilter.GaussianBlur(0.3 + 0.3 * level)))
    xs, ys = _grid(img)
    jx, jy = (rng.integers(-d, d + 1, size=(h, w)) for _ in range(2))
    return soft[np.clip(ys.astype(np.intp) + jy, 0, h - 1), np.clip(xs.astype(np.intp) + jx, 0, w - 1)]


def zoom_blur(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Zooming while exposed: the mean of the image and copies enlarged by up to 3..9% around the centre."""
    h, w = img.shape[:2]
    acc = img.astype(np.float32)
    factors = np.linspace(1.0, 1.03 + 0.06 * level, 4)[1:]
    for z in factors:
        zw, zh = round(w * z), round(h * z)
        big = Image.fromarray(img).resize((zw, zh), _BILINEAR)
        left, top = (zw - w) // 2, (zh - h) // 2
        acc += np.asarray(big.crop((left, top, left + w, top + h)), dtype=np.float32)
    return _u8(acc / (len(factors) + 1))


# Weather (STRAug Fog, Snow, Frost, Rain, Shadow).
def fog(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Patchy haze: a smooth bright field blended in, contrast falling to 1/1.9."""
    h, w = img.shape[:2]
    haze = 0.5 + 0.35 * _smooth_field(rng, (h, w), (2, 4)) + 0.15 * _smooth_field(rng, (h, w), (4, 10))
    a = 0.3 + 0.6 * level
    return _u8((img + a * 255.0 * haze[..., None]) / (1.0 + a))


def snow(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Falling flakes on a slightly whitened image: 1..4% of the pixels, smeared by a short motion blur."""
    h, w = img.shape[:2]
    flakes = np.zeros((h, w, 3), dtype=np.uint8)
    flakes[rng.random((h, w)) < 0.01 + 0.03 * level] = 255
    flakes = motion_blur(flakes, 0.0, rng).astype(np.float32) * 2.5
    return _u8(np.maximum(0.85 * img + 0.15 * 255.0 * level, flakes))


def frost(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Ice on the lens: a crystalline pale-blue texture at 20..40% opacity over a dimmed image."""
    h, w = img.shape[:2]
    crystals = _smooth_field(rng, (h, w), (max(2, h // 2), max(2, w // 2)))
    crystals += 0.5 * _smooth_field(rng, (h, w), (max(2, h // 4), max(2, w // 4)))
    ice = np.clip(np.abs(crystals) / 1.5, 0, 1)[..., None] * np.array([225.0, 240.0, 255.0])
    b = 0.2 + 0.2 * level
    return _u8((1.0 - b) * img + b * ice)


def rain(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Slanted streaks: 4..20 light grey lines a third of the height long, at one slant."""
    h, w = img.shape[:2]
    out = Image.fromarray(img)
    draw = ImageDraw.Draw(out)
    slant, length = rng.uniform(-0.4, 0.4), h / 3
    shade = int(rng.integers(180, 230))
    for _ in range(4 + round(16 * level)):
        x, y = rng.uniform(0, w), rng.uniform(-length, h)
        draw.line([(x, y), (x + slant * length, y + length)], fill=(shade,) * 3, width=1)
    return np.asarray(out, dtype=np.uint8)


def shadow(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A shadow across part of the word: a band from top to bottom darkened to 0.7..0.4."""
    h, w = img.shape[:2]
    x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * w)
    tilt = rng.uniform(-0.3, 0.3) * w
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([(x0, 0), (x1, 0), (x1 + tilt, h), (x0 + tilt, h)], fill=255)
    dark = 1.0 - (0.3 + 0.3 * level) * np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return _u8(img * dark)


# Camera (STRAug Contrast, Brightness, JpegCompression, Pixelate).
def contrast(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Flatten the contrast towards the mean to 1 - 0.6 level of what it was."""
    mean = img.reshape(-1, 3).mean(0)
    return _u8((img - mean) * (1.0 - 0.6 * level) + mean)


def brightness(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Brighten or darken every pixel by 0.05..0.3 of the range."""
    return _u8(img + 255.0 * (0.05 + 0.25 * level) * rng.choice((-1.0, 1.0)))


def jpeg(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG artefacts at quality 70 down to 15."""
    return _pil(img, lambda im: jpeg_roundtrip(im, int(70 - 55 * level)))


def pixelate(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Too few pixels: down to 0.85..0.5 of the size (box filter), then back up (nearest)."""
    h, w = img.shape[:2]
    f = 0.85 - 0.35 * level
    small = (max(1, round(w * f)), max(1, round(h * f)))
    return _pil(img, lambda im: im.resize(small, _BOX).resize((w, h), Image.Resampling.NEAREST))


# Process (STRAug Posterize, Solarize, Invert, Equalize, Color).
def posterize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Keep 6 down to 3 bits per channel."""
    return _pil(img, lambda im: ImageOps.posterize(im, 6 - round(3 * level)))


def solarize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Invert the pixels brighter than a threshold of 240 down to 150."""
    return _pil(img, lambda im: ImageOps.solarize(im, int(240 - 90 * level)))


def invert(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """The negative (the level does not matter)."""
    return 255 - img


def equalize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Histogram equalization (the level does not matter)."""
    return _pil(img, ImageOps.equalize)


def color_shift(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Permute the channels and scale each by 1 +- 0.4 level: other hues, same shapes."""
    gains = 1.0 + 0.4 * level * rng.uniform(-1.0, 1.0, size=3)
    return _u8(img[..., rng.permutation(3)] * gains)


FAMILIES: dict[str, tuple[Op, ...]] = {
    "warp": (curve, distort, stretch),
    "geometry": (rotate, perspective, shrink),
    "noise": (gaussian_noise, shot_noise, impulse_noise, speckle_noise),
    "blur": (gaussian_blur, defocus_blur, motion_blur, glass_blur, zoom_blur),
    "weather": (fog, snow, frost, rain, shadow),
    "camera": (contrast, brightness, jpeg, pixelate),
    "process": (posterize, solarize, invert, equalize, color_shift),
}
AUGMENTS = ("none", "straug")  # the choices of `recognizer train --augment`


@dataclass(frozen=True)
class AugmentConfig:
    """How ``augment`` changes a training image: ``ops`` draws of an op, each applied with ``prob``."""

    ops: int = 2  # N (RandAugment): distinct ops drawn per image
    magnitude: float = 0.5  # M in [0, 1]: each op's level is drawn in [M/2, M]
    prob: float = 0.5  # each drawn op applies with this probability: 1/4 of images stay as they were at N=2
    families: tuple[str, ...] = tuple(FAMILIES)

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown augmentation families {sorted(unknown)}; "
                             f"choose from {', '.join(FAMILIES)}")
        if not 0 <= self.ops <= len(self.operations()):
            raise ValueError(f"ops must be within 0..{len(self.operations())}, got {self.ops}")
        if not 0.0 <= self.magnitude <= 1.0 or not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"magnitude and prob must be in [0, 1], got {self.magnitude} and {self.prob}")

    def operations(self) -> tuple[Op, ...]:
        """The ops of the chosen families, in FAMILIES' order."""
        return tuple(op for name in self.families for op in FAMILIES[name])


def augment(img: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """``img`` (uint8 ``[H, W, 3]``) with up to ``config.ops`` distinct random ops applied, in random order.

    The same generator state gives the same output; the input is never modified.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"augment takes a uint8 [H, W, 3] array, got {img.dtype} {img.shape}")
    ops = config.operations()
    out = img
    for i in rng.choice(len(ops), size=config.ops, replace=False):
        if rng.random() < config.prob:
            out = ops[i](out, config.magnitude * rng.uniform(0.5, 1.0), rng)
    return out
