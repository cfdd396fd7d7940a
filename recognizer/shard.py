"""Split one word-image LMDB into per-edge shards: IID as in the paper, or non-IID by style family
or by a Dirichlet(alpha) draw over style families or label kinds, as federated-learning benchmarks do."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from recognizer.lmdb_data import STYLE_KEY, DatasetError, LmdbReader, LmdbWriter, sample_key

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("iid", "style", "dirichlet-style", "dirichlet-label")
LABEL_KINDS: tuple[str, ...] = ("words", "digits", "codes")
DIRICHLET_TRIES = 100  # draws before a split that leaves a shard empty is given up
SHARD_NAME = "shard%d"  # out/shard0 ... out/shard{parts-1}


def iid_assignment(count: int, parts: int, seed: int) -> list[np.ndarray]:
    """Sample indices per shard: a seeded uniform permutation cut into sizes that differ by at most 1."""
    perm = np.random.default_rng(seed).permutation(count)
    return [np.sort(chunk) for chunk in np.array_split(perm, parts)]


def style_assignment(styles: list[str], parts: int, seed: int, dominance: float = 0.8) -> list[np.ndarray]:
    """Sample indices per shard, skewed by style family.

    Families (sorted) get home shards round-robin: with at least as many shards as families each
    shard is home to one family, otherwise to several. A sample goes to one of its family's home
    shards with probability ``dominance``, else to a uniformly random shard, so every shard is
    dominated by its home families yet sees a little of the others.
    """
    if not 0.0 <= dominance <= 1.0:
        raise ValueError(f"dominance must be in [0, 1], got {dominance}")
    families = sorted(set(styles))
    homes: dict[str, list[int]] = {f: [] for f in families}
    for shard in range(max(parts, len(families))):
        homes[families[shard % len(families)]].append(shard % parts)
    rng = np.random.default_rng(seed)
    stay = rng.random(len(styles)) < dominance
    anywhere = rng.integers(0, parts, size=len(styles))
    pick = rng.random(len(styles))
    target = np.empty(len(styles), dtype=np.int64)
    for i, family in enumerate(styles):
        home = homes[family]
        target[i] = home[int(pick[i] * len(home))] if stay[i] else anywhere[i]
    return [np.flatnonzero(target == shard) for shard in range(parts)]


def label_kind(label: str) -> str:
    """What a label is: ``digits`` (digits only), ``words`` (letters, hyphens, apostrophes, spaces)
    or ``codes`` (anything else: letters with digits, punctuation)."""
    if label.isdigit():
        return "digits"
    if all(c.isalpha() or c in "-' " for c in label):
        return "words"
    return "codes"


def dirichlet_assignment(classes: list[str], parts: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Sample indices per shard: each class's samples are dealt to the shards in proportions drawn
    from Dirichlet(alpha, ..., alpha) (Hsu et al. 2019), so a small alpha gives each shard a few
    classes. Draws again (up to DIRICHLET_TRIES times) while a shard would be empty.
    """
    if not 0.0 < alpha < np.inf:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    labels = np.array(classes)
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_TRIES):
        target = np.empty(len(classes), dtype=np.int64)
        for name in sorted(set(classes)):
            members = rng.permutation(np.flatnonzero(labels == name))
            cuts = (np.cumsum(rng.dirichlet(np.full(parts, alpha)))[:-1] * members.size).astype(int)
            for shard, chunk in enumerate(np.split(members, cuts)):
                target[chunk] = shard
        shards = [np.flatnonzero(target == shard) for shard in range(parts)]
        if all(len(s) for s in shards):
            return shards
    raise DatasetError(f"Dirichlet({alpha}) left a shard empty in {DIRICHLET_TRIES} draws; use fewer parts")


def _styles_of(reader: LmdbReader) -> list[str]:
    styles = []
    for i in range(len(reader)):
        style = reader.get_style(i)
        if style is None:
            key = sample_key(STYLE_KEY, i + 1).decode()
            which = f"key {key!r} missing" + (" (the set has no style keys)" if i == 0 else "")
            raise DatasetError(f"{reader.path}: {which}; split mode 'style' needs style keys")
        styles.append(style)
    return styles


def split_dataset(
    input: Path, parts: int, out: Path, mode: str = "iid", seed: int = 0, *,
    dominance: float = 0.8, alpha: float = 0.5, overwrite: bool = False,
) -> list[Path]:
    """Split the LMDB at ``input`` into ``parts`` new LMDBs ``out/shard0`` ... ``out/shard{parts-1}``.

    Image bytes, labels and styles are copied unchanged; each shard keeps its samples in input order.

    Parameters:
        mode: ``iid`` (uniform random, sizes differ by at most 1), ``style`` (non-IID by style
            family, see ``style_assignment``; needs style keys), ``dirichlet-style`` or
            ``dirichlet-label`` (``dirichlet_assignment`` over style families or label kinds).
        dominance: for ``style``, the chance a sample lands on one of its family's home shards.
        alpha: for the Dirichlet modes, the concentration (small: each shard holds few classes).

    Returns:
        The shard paths, in shard order.

    Raises:
        DatasetError: unreadable input, no style keys for ``style``, a shard would be empty, or an
            output shard exists and ``overwrite`` is false.
        ValueError: unknown mode or ``parts`` < 1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; choose from {', '.join(MODES)}")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    reader = LmdbReader(Path(input))
    if len(reader) < parts:
        raise DatasetError(f"{reader.path}: {len(reader)} samples cannot fill {parts} shards")
    if mode == "iid":
        shards = iid_assignment(len(reader), parts, seed)
    elif mode == "dirichlet-style":
        shards = dirichlet_assignment(_styles_of(reader), parts, alpha, seed)
    elif mode == "dirichlet-label":
        kinds = [label_kind(reader.get_label(i)) for i in range(len(reader))]
        shards = dirichlet_assignment(kinds, parts, alpha, seed)
    else:
        shards = style_assignment(_styles_of(reader), parts, seed, dominance)
        empty = [i for i, idx in enumerate(shards) if len(idx) == 0]
        if empty:
            raise DatasetError(f"{reader.path}: style split leaves shards {empty} empty; use fewer parts")
    paths = []
    for shard, indices in enumerate(shards):
        path = Path(out) / (SHARD_NAME % shard)
        with LmdbWriter(path, overwrite=overwrite) as writer:
            for i in indices:
                writer.add(*reader.get_raw(int(i)))
        logger.info("wrote %s: %d samples", path, len(indices))
        paths.append(path)
    reader.close()
    return paths


def shard_statistics(path: Path) -> dict:
    """A shard's size and its histograms of style families and label kinds."""
    reader = LmdbReader(Path(path))
    try:
        styles: dict[str, int] = {}
        kinds = dict.fromkeys(LABEL_KINDS, 0)
        for i in range(len(reader)):
            style = reader.get_style(i) or "-"
            styles[style] = styles.get(style, 0) + 1
            kinds[label_kind(reader.get_label(i))] += 1
        return {"shard": str(path), "size": len(reader), "styles": dict(sorted(styles.items())),
                "label_kinds": kinds}
    finally:
        reader.close()
