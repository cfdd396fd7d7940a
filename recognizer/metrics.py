"""Recognition metrics as in the paper: case-insensitive word accuracy on alphanumerics."""

from __future__ import annotations

from collections.abc import Sequence

_ALPHANUMERIC = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def normalize(text: str) -> str:
    """Lower-case ``text`` and keep only ASCII letters and digits (``"Don't!"`` -> ``"dont"``).

    Non-ASCII letters are dropped too, as the paper's 36-symbol evaluation alphabet has none.
    """
    return "".join(c for c in text.lower() if c in _ALPHANUMERIC)


def _check_pairs(predictions: Sequence[str], labels: Sequence[str], what: str) -> None:
    """Raise ValueError unless there is one prediction per label and at least one label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError(f"{what} of no samples is undefined")


def word_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of samples whose normalized prediction equals the normalized label.

    A label with no alphanumerics (``"!!"``) normalizes to ``""`` and so counts as correct only
    when the prediction normalizes to ``""`` as well; such samples are kept, not skipped, so the
    denominator is always ``len(labels)``.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(predictions, labels, "word accuracy")
    correct = sum(normalize(p) == normalize(t) for p, t in zip(predictions, labels, strict=True))
    return correct / len(labels)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Mean of 1 - normalized edit distance (ICDAR 2019's 1-N.E.D.) over normalized pairs.

    Each pair scores 1 - d / max(len(p), len(t)) (1 when both are empty): partial credit that shows
    a recognizer learning before whole words come out right.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(predictions, labels, "character accuracy")
    total = 0.0
    for p, t in zip(predictions, labels, strict=True):
        p, t = normalize(p), normalize(t)
        longest = max(len(p), len(t))
        total += 1.0 - edit_distance(p, t) / longest if longest else 1.0
    return total / len(labels)
