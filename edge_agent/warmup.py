"""Warm-up data: the synthetic words an edge renders itself for the plan's warm-up rounds.

The paper pre-trains on synthetic words before the owners' data; here each edge renders its own
from the plan's seed and its identity (so edges render different words), with the styles and label
kind the plan names. Nothing is downloaded and nothing private is used. The set is rendered once
into the work directory and kept across restarts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from fedocr.v1 import federation_pb2 as pb

SPEC_FILE = "warmup.json"


def warmup_seed(seed: int, edge_id: str) -> int:
    """The rendering seed of one edge: the plan's seed and the edge's identity."""
    return int.from_bytes(hashlib.sha256(f"warmup/{seed}/{edge_id}".encode()).digest()[:4], "little")


def warmup_data(
    work_dir: Path, edge_id: str, warmup: pb.WarmUp, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The LMDB of this edge's warm-up words, rendered on first use; ``progress(done, total)``.

    Raises:
        ValueError: the plan names styles or a label kind this edge's renderer does not know.
    """
    from recognizer.synth import ALL_STYLES, CLASSIC, VARIED, Sources, render_dataset

    spec = {"words": warmup.words, "styles": warmup.styles, "labels": warmup.labels, "seed": warmup.seed,
            "edge_id": edge_id}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = work_dir / f"warmup-{digest}"
    if (out / SPEC_FILE).exists():
        return out
    styles = [s for s in warmup.styles.split(",") if s]
    if not styles or any(s not in ALL_STYLES for s in styles):
        raise ValueError(f"warm-up styles {warmup.styles!r}; this edge renders {', '.join(ALL_STYLES)}")
    # The varied style draws on the training side of the font and background splits, as the
    # general-purpose recipe does (recognizer/recipe.py).
    sources = Sources(fonts="train", backgrounds="train") if VARIED in styles else CLASSIC
    partial = work_dir / f".warmup-{digest}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    step = max(1, warmup.words // 10)

    def report(done: int) -> None:
        if progress is not None and (done % step == 0 or done == warmup.words):
            progress(done, warmup.words)

    render_dataset(partial, warmup.words, warmup_seed(warmup.seed, edge_id), styles, labels=warmup.labels,
                   sources=sources, progress=report)
    (partial / SPEC_FILE).write_text(json.dumps(spec))
    partial.rename(out)  # complete or absent: a restart mid-render starts it over
    return out
