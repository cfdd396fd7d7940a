"""Recognition metrics as in the paper: case-insensitive word accuracy on alphanumerics."""

from __future__ import annotations

from collections.abc import Sequence

_ALPHANUMERIC = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def normalize(text: str) -> str:
    """Lower-case ``text`` and keep only ASCII letters and digits (``"Don't!"`` -> ``"dont"``).

    Non-ASCII letters are dropped too, as the paper's 36-symbol evaluation alphabet has none.
    """
    return "".join(c for c in text.lower() if c in _ALPHANUMERIC)


def word_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of samples whose normalized prediction equals the normalized label.

    A label with no alphanumerics (``"!!"``) normalizes to ``""`` and so counts as correct only
    when the prediction normalizes to ``""`` as well; such samples are kept, not skipped, so the
    denominator is always ``len(labels)``.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("word accuracy of no samples is undefined")
    correct = sum(normalize(p) == normalize(t) for p, t in zip(predictions, labels, strict=True))
    return correct / len(labels)
