"""A second rasterizer that training never uses: word images drawn by matplotlib's Agg into an LMDB.

``recognizer.synth`` draws with Pillow's FreeType path; this draws with matplotlib's own text
engine (its font manager, hinting and Agg anti-aliasing) and the fonts matplotlib ships, so a
model that reads only one rasterizer's glyph shapes shows it here. Labels come from
``synth.LABEL_KINDS``; size, colours and rotation vary by a per-sample seed. matplotlib is in the
``experiment`` extra and is imported only when rendering.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recognizer import styles as fx
from recognizer.lmdb_data import LmdbWriter
from recognizer.synth import JPEG_QUALITY, LABEL_KINDS, SynthError

STYLE = "agg"  # the style key of every sample
# matplotlib's bundled text faces (mpl-data/fonts/ttf); its Computer Modern faces use a TeX encoding.
FAMILIES = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral")
_FACES = ((style, weight) for style in ("normal", "italic") for weight in ("normal", "bold"))
FACES = tuple((family, style, weight) for style, weight in _FACES for family in FAMILIES)
_CANVAS = (640, 200)  # pixels; wide enough for a 25-letter word at the largest size below


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise SynthError("the Agg renderer needs matplotlib: pip install 'fedocr[experiment]'") from exc
    matplotlib.use("Agg", force=False)
    return matplotlib


@functools.cache
def font_properties() -> tuple[Any, ...]:
    """A FontProperties per face of FACES, each resolved to a bundled file (no fallback to another family)."""
    _matplotlib()
    from matplotlib.font_manager import FontProperties, findfont

    props = []
    for family, style, weight in FACES:
        path = findfont(FontProperties(family=family, style=style, weight=weight), fallback_to_default=False)
        props.append(FontProperties(fname=path))
    return tuple(props)


class AggRenderer:
    """One Agg figure reused for every word (a figure per word would cost more than the drawing)."""

    def __init__(self) -> None:
        _matplotlib()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(_CANVAS[0] / 100, _CANVAS[1] / 100), dpi=100)
        self.canvas = FigureCanvasAgg(self.figure)
        self.fonts = font_properties()

    def render(self, label: str, rng: random.Random) -> Image.Image:
        """``label`` at a random size (24..48 px), face, colour pair and angle (-8..8 degrees), cropped."""
        background = fx.random_color(rng)
        ink = fx.contrasting_color(rng, background)
        font = self.fonts[rng.randrange(len(self.fonts))].copy()
        font.set_size(rng.uniform(24, 48) * 72 / 100)  # points at 100 dpi
        self.figure.clear()
        self.figure.set_facecolor(tuple(c / 255 for c in background))
        text = self.figure.text(0.5, 0.5, label, ha="center", va="center", fontproperties=font,
                                color=tuple(c / 255 for c in ink), rotation=rng.uniform(-8, 8),
                                parse_math=False)  # a "$" in a label is a dollar sign, not TeX
        self.canvas.draw()
        box = text.get_window_extent(self.canvas.get_renderer())
        pixels = np.asarray(self.canvas.buffer_rgba())[..., :3]
        h, w = pixels.shape[:2]
        pad_x, pad_y = rng.uniform(2, 8), rng.uniform(2, 6)
        left, right = max(0, int(box.x0 - pad_x)), min(w, int(np.ceil(box.x1 + pad_x)))
        top, bottom = max(0, int(h - box.y1 - pad_y)), min(h, int(np.ceil(h - box.y0 + pad_y)))
        return Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))


def render_agg_dataset(
    out: Path, count: int, seed: int, *, labels: str = "words", quality: int = JPEG_QUALITY,
    overwrite: bool = False,
) -> dict:
    """Render ``count`` word images with Agg into a new LMDB at ``out`` (style key ``agg``).

    Sample i's label and look come from ``random.Random(f"fedocr-agg/{seed}/{i}")``: the same seed
    gives the same set. ``labels`` is a ``synth.LABEL_KINDS`` name.

    Returns:
        A summary: path, count, seed, labels, seconds and images per second.

    Raises:
        SynthError: ``count`` < 1, an unknown label kind, or matplotlib is not installed.
        DatasetError: ``out`` already holds an LMDB and ``overwrite`` is false.
    """
    if labels not in LABEL_KINDS:
        raise SynthError(f"unknown label kind {labels!r}; choose from {', '.join(LABEL_KINDS)}")
    if count < 1:
        raise SynthError(f"count must be >= 1, got {count}")
    renderer = AggRenderer()
    start = time.perf_counter()
    with LmdbWriter(Path(out), overwrite=overwrite) as writer:
        for i in range(count):
            rng = random.Random(f"fedocr-agg/{seed}/{i}")
            label = LABEL_KINDS[labels](rng)
            writer.add(fx.jpeg_bytes(renderer.render(label, rng), quality), label, STYLE)
    seconds = time.perf_counter() - start
    return {"path": str(out), "count": count, "seed": seed, "labels": labels, "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 1) if seconds else 0.0}
