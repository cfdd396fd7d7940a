"""Image effects of the synthetic word renderer: colours, backgrounds, geometric warps, degradations."""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
_BILINEAR = Image.Resampling.BILINEAR


def luminance(color: RGB) -> float:
    """Perceived brightness of ``color`` in [0, 255] (ITU-R BT.601 weights)."""
    r, g, b = color
    return 0.299 * r + 0.587 * g + 0.114 * b


def random_color(rng: random.Random) -> RGB:
    """A uniformly random RGB colour."""
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def contrasting_color(rng: random.Random, background: RGB, min_contrast: float = 90.0) -> RGB:
    """A random colour whose luminance differs from ``background``'s by at least ``min_contrast``."""
    bg = luminance(background)
    for _ in range(20):
        color = random_color(rng)
        if abs(luminance(color) - bg) >= min_contrast:
            return color
    # Rarely reached: fall back to near-black or near-white, whichever is farther.
    v = rng.randrange(0, 50) if bg > 127 else rng.randrange(205, 256)
    return v, v, v


def numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator drawn from ``rng``, so array noise follows the per-sample seed."""
    return np.random.default_rng(rng.getrandbits(64))


def solid_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A flat background of one random colour."""
    return Image.new("RGB", size, random_color(rng))


def gradient_background(rng: random.Random, size: tuple[int, int], spread: int = 60) -> Image.Image:
    """A four-corner bilinear gradient around a random base colour."""
    base = random_color(rng)
    corners = [tuple(min(255, max(0, c + rng.randint(-spread, spread))) for c in base) for _ in range(4)]
    tiny = Image.new("RGB", (2, 2))
    tiny.putdata(corners)
    # Upsampling a 2x2 image is the cheapest smooth gradient Pillow offers.
    return tiny.resize(size, _BILINEAR, box=(0.5, 0.5, 1.5, 1.5))


def texture_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A blotchy texture (coarse noise upsampled) with fine grain and a few faint strokes."""
    w, h = size
    gen = numpy_rng(rng)
    base = np.array(random_color(rng), dtype=np.float32)
    cells = gen.normal(0.0, rng.uniform(10, 40), size=(rng.randint(2, 6), rng.randint(3, 12), 3))
    coarse = Image.fromarray(np.clip(base + cells, 0, 255).astype(np.uint8))
    coarse = coarse.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(coarse, dtype=np.float32) + gen.normal(0.0, rng.uniform(2, 10), size=(h, w, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):
        shade = tuple(min(255, max(0, int(c) + rng.randint(-40, 40))) for c in base)
        draw.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
                  fill=shade, width=rng.randint(1, 3))
    return img


def rotate(mask: Image.Image, rng: random.Random, max_degrees: float = 20.0) -> Image.Image:
    """Rotate a text mask by a random angle of 4..``max_degrees`` degrees either way, expanding it."""
    angle = rng.uniform(4.0, max_degrees) * rng.choice((-1, 1))
    return mask.rotate(angle, resample=_BILINEAR, expand=True)


def _perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    # Solve the 8 homography coefficients that map output points ``dst`` to input points ``src``.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)).tolist()


def perspective(mask: Image.Image, rng: random.Random, strength: float = 0.2) -> Image.Image:
    """Warp a text mask as if seen from one side: corners move by up to ``strength`` of the height."""
    w, h = mask.size
    src = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
    # Shrink one vertical edge (the far side) and jitter every corner.
    shrink = rng.uniform(0.05, strength) * h
    far = (0, 3) if rng.random() < 0.5 else (1, 2)
    dst = []
    for i, (x, y) in enumerate(src):
        squeeze = (shrink if y == 0.0 else -shrink) if i in far else 0.0
        jx, jy = rng.uniform(-1, 1) * strength * h, rng.uniform(-0.5, 0.5) * strength * h
        dst.append((x + jx, y + squeeze + jy))
    min_x, min_y = min(p[0] for p in dst), min(p[1] for p in dst)
    dst = [(x - min_x, y - min_y) for x, y in dst]
    size = (int(math.ceil(max(p[0] for p in dst))) + 1, int(math.ceil(max(p[1] for p in dst))) + 1)
    return mask.transform(size, Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, src), _BILINEAR)


def curve(mask: Image.Image, rng: random.Random, strips: int = 16) -> Image.Image:
    """Bend a text mask along an arc or a sine wave by shifting vertical strips (a mesh warp)."""
    w, h = mask.size
    strips = max(1, min(strips, w // 4))  # strips of a few pixels at least
    amp = rng.uniform(0.15, 0.5) * h * min(1.0, w / (4.0 * h))  # short words bend less
    if rng.random() < 0.6:
        sign = rng.choice((-1, 1))  # arc: smile or frown
        shift = [sign * amp * (2.0 * i / strips - 1.0) ** 2 for i in range(strips + 1)]
    else:
        cycles, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * math.pi)
        shift = [amp * math.sin(2 * math.pi * cycles * i / strips + phase) for i in range(strips + 1)]
    low = min(shift)
    shift = [s - low for s in shift]  # all >= 0: the output grows downward by max(shift)
    out_h = h + int(math.ceil(max(shift)))
    mesh = []
    for i in range(strips):
        x0, x1 = round(w * i / strips), round(w * (i + 1) / strips)
        s0, s1 = shift[i], shift[i + 1]
        # Output box -> source quad (upper-left, lower-left, lower-right, upper-right).
        quad = (x0, -s0, x0, out_h - s0, x1, out_h - s1, x1, -s1)
        mesh.append(((x0, 0, x1, out_h), quad))
    return mask.transform((w, out_h), Image.Transform.MESH, mesh, _BILINEAR)


def blur(img: Image.Image, rng: random.Random) -> Image.Image:
    """Defocus (Gaussian) or horizontal motion blur, scaled to the image height."""
    h = img.size[1]
    if rng.random() < 0.65:
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.025, 0.06) * h))
    n = 5
    kernel = [0.0] * (n * n)
    for x in range(n):
        kernel[(n // 2) * n + x] = 1.0
    out = img.filter(ImageFilter.Kernel((n, n), kernel, scale=n))
    return out.filter(ImageFilter.Kernel((n, n), kernel, scale=n)) if h > 44 else out


def add_noise(img: Image.Image, rng: random.Random) -> Image.Image:
    """Gaussian pixel noise of random strength, sometimes with salt-and-pepper specks."""
    gen = numpy_rng(rng)
    arr = np.asarray(img, dtype=np.float32)
    channels = 1 if rng.random() < 0.5 else 3  # grey grain or colour grain
    arr = arr + gen.normal(0.0, rng.uniform(8.0, 30.0), size=arr.shape[:2] + (channels,))
    if rng.random() < 0.4:
        specks = gen.random(arr.shape[:2]) < rng.uniform(0.005, 0.03)
        arr[specks] = gen.choice([0.0, 255.0], size=(int(specks.sum()), 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def downscale(img: Image.Image, rng: random.Random, min_h: int = 12, max_h: int = 20) -> Image.Image:
    """Shrink an image to a height of ``min_h``..``max_h`` pixels, as a distant or low-resolution crop."""
    w, h = img.size
    new_h = rng.randint(min_h, max_h)
    if new_h >= h:
        return img
    new_w = max(1, round(w * new_h / h))
    return img.resize((new_w, new_h), rng.choice((Image.Resampling.BOX, _BILINEAR, Image.Resampling.NEAREST)))


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """``img`` encoded as JPEG at ``quality``."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """``img`` (RGB) after a round trip through JPEG at ``quality``: its blocks and ringing."""
    with Image.open(io.BytesIO(jpeg_bytes(img, quality))) as out:
        return out.convert("RGB")
