"""Text effects of the ``varied`` style: how a word is warped, shadowed, blended, lit and degraded.

Each effect is drawn independently with its own probability (EFFECT_ODDS), so one image may carry
several; all randomness comes from the sample's ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from recognizer import styles as fx

# Probability of each effect per image; warps are exclusive (one of them, or none).
EFFECT_ODDS: dict[str, float] = {
    "border": 0.2, "shadow": 0.2, "blend": 0.3, "lighting": 0.3, "motion_blur": 0.12, "blur": 0.15,
    "noise": 0.2, "lowres": 0.12, "jpeg": 0.25,
}
WARP_ODDS: dict[str, float] = {"rotate": 0.2, "perspective": 0.2, "curve": 0.15}


def pick_warp(rng: random.Random) -> Callable[[Image.Image, random.Random], Image.Image] | None:
    """One of the geometric warps (small rotation, perspective, arc or sine curve), or None."""
    pick = rng.random()
    for name, odds in WARP_ODDS.items():
        if pick < odds:
            return {"rotate": _small_rotate, "perspective": fx.perspective, "curve": fx.curve}[name]
        pick -= odds
    return None


def _small_rotate(mask: Image.Image, rng: random.Random) -> Image.Image:
    return fx.rotate(mask, rng, max_degrees=10.0)


def crop_margins(rng: random.Random, height: int) -> tuple[int, int, int, int]:
    """Left, top, right, bottom margins around the text: loose or tight, now and then cutting into it."""
    def one() -> int:
        return round(height * (rng.uniform(-0.06, 0.0) if rng.random() < 0.15 else rng.uniform(0.0, 0.35)))
    return one(), one(), one(), one()


def shadow(img: Image.Image, mask: Image.Image, corner: tuple[int, int], rng: random.Random) -> None:
    """Draw a soft drop shadow of ``mask`` into ``img``, offset from ``corner`` (in place)."""
    h = mask.size[1]
    dx, dy = (round(rng.uniform(0.03, 0.12) * h) * rng.choice((-1, 1)) for _ in range(2))
    soft = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.08) * h))
    strength = rng.uniform(0.4, 0.9)
    soft = soft.point(lambda v: round(v * strength))
    bg = img.getpixel((img.size[0] // 2, img.size[1] // 2))
    dark = fx.luminance(bg) > 100
    color = (rng.randrange(0, 60),) * 3 if dark else (rng.randrange(200, 256),) * 3
    img.paste(color, (corner[0] + dx, corner[1] + dy), soft)


def blend(mask: Image.Image, rng: random.Random) -> Image.Image:
    """``mask`` made partly transparent, so the background shows through the ink."""
    alpha = rng.uniform(0.55, 0.9)
    return mask.point(lambda v: round(v * alpha))


def uneven_lighting(img: Image.Image, rng: random.Random) -> Image.Image:
    """Multiply by a smooth gain field (a linear ramp or a spot of light), as under uneven light."""
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / max(1, w - 1), yy / max(1, h - 1)
    if rng.random() < 0.5:
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        field = a * (xx - 0.5) + b * (yy - 0.5)
    else:
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.2, 0.8)
        field = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)) - 0.5
    gain = 1.0 + rng.uniform(0.3, 0.7) * field
    arr = np.asarray(img, dtype=np.float32) * gain[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def motion_blur(img: Image.Image, rng: random.Random) -> Image.Image:
    """Average ``img`` along a line of 3 to 9 pixels at a random angle (camera or subject motion)."""
    length = rng.randint(3, 9)
    angle = rng.uniform(0, np.pi)
    arr = np.asarray(img, dtype=np.float32)
    pad = length
    padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = arr.shape[:2]
    out = np.zeros_like(arr)
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, length):
        dx, dy = round(t * np.cos(angle)), round(t * np.sin(angle))
        out += padded[pad + dy: pad + dy + h, pad + dx: pad + dx + w]
    return Image.fromarray(np.clip(out / length, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    """``img`` after a round trip through heavy JPEG compression (quality 10 to 45): blocks and ringing."""
    return fx.jpeg_roundtrip(img, rng.randint(10, 45))


def degrade(img: Image.Image, rng: random.Random, draw: dict[str, bool]) -> Image.Image:
    """Apply the drawn whole-image effects in a fixed order: light, motion, blur, noise, resolution, JPEG."""
    if draw["lighting"]:
        img = uneven_lighting(img, rng)
    if draw["motion_blur"]:
        img = motion_blur(img, rng)
    if draw["blur"]:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.01, 0.04) * img.size[1]))
    if draw["noise"]:
        img = fx.add_noise(img, rng)
    if draw["lowres"]:
        size = img.size
        img = fx.downscale(img, rng, 10, 24).resize(size, Image.Resampling.BILINEAR)
    if draw["jpeg"]:
        img = jpeg(img, rng)
    return img


def draw_effects(rng: random.Random) -> dict[str, bool]:
    """Which effects one image gets, each drawn with its EFFECT_ODDS probability."""
    return {name: rng.random() < odds for name, odds in EFFECT_ODDS.items()}
