"""The recognizer's vocabulary: 94 printable ASCII characters plus EOS, PAD and UNK."""

from __future__ import annotations

import string

# Order is part of the model: class ids index the decoder's output layer.
PRINTABLE = string.digits + string.ascii_letters + string.punctuation  # 10 + 52 + 32 = 94
EOS, PAD, UNK = len(PRINTABLE), len(PRINTABLE) + 1, len(PRINTABLE) + 2
NUM_CLASSES = len(PRINTABLE) + 3  # 97
# The decoder's "start" symbol is one more embedding row, never an output class (as in ASTER).
START = NUM_CLASSES

_INDEX = {c: i for i, c in enumerate(PRINTABLE)}


def out_of_vocabulary(text: str) -> set[str]:
    """Characters of ``text`` the vocabulary cannot represent."""
    return {c for c in text if c not in _INDEX}


def encode(text: str, max_len: int | None = None) -> list[int]:
    """Class ids of ``text`` followed by EOS; unknown characters map to UNK.

    With ``max_len`` the result is cut to ``max_len - 1`` characters plus EOS.
    """
    ids = [_INDEX.get(c, UNK) for c in text]
    if max_len is not None:
        ids = ids[: max_len - 1]
    return ids + [EOS]


def decode(ids: list[int]) -> str:
    """Text of a class-id sequence, stopping at the first EOS; PAD, UNK and START are dropped."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if 0 <= i < len(PRINTABLE):
            out.append(PRINTABLE[i])
    return "".join(out)

# Longest transcription the decoder reads or writes; sequences are MAX_LABEL_LEN + 1 long (EOS).
MAX_LABEL_LEN = 25
MAX_SEQ_LEN = MAX_LABEL_LEN + 1
