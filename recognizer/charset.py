"""The recognizer's alphabets: which symbols it reads, how labels are folded to them, class ids.

Every alphabet shares the two special classes EOS (0) and PAD (1); its symbols follow from id 2 on.
The decoder's "start" symbol is one more embedding row (``Alphabet.start``), never an output class.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property

EOS, PAD = 0, 1
_SPECIALS = 2

# Longest transcription the decoder reads or writes; sequences are MAX_LABEL_LEN + 1 long (EOS).
MAX_LABEL_LEN = 25
MAX_SEQ_LEN = MAX_LABEL_LEN + 1

PRINTABLE = string.digits + string.ascii_letters + string.punctuation  # 10 + 52 + 32 = 94


@dataclass(frozen=True)
class Alphabet:
    """The symbols a model reads. A case-insensitive alphabet folds labels to lower case first.

    Labels are folded when read (``fold``): case folded where the alphabet ignores case, and any
    symbol outside it dropped, so a dataset with any labels trains every alphabet.
    """

    name: str
    symbols: str
    case_sensitive: bool

    def __post_init__(self) -> None:
        if not self.symbols or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"alphabet {self.name!r} needs distinct symbols, got {self.symbols!r}")
        if not self.case_sensitive and self.symbols != self.symbols.lower():
            raise ValueError(f"case-insensitive alphabet {self.name!r} must hold lower-case symbols only")

    @cached_property
    def _index(self) -> dict[str, int]:
        return {c: i + _SPECIALS for i, c in enumerate(self.symbols)}

    @property
    def num_classes(self) -> int:
        """Output classes: EOS, PAD and one per symbol."""
        return len(self.symbols) + _SPECIALS

    @property
    def start(self) -> int:
        """The decoder's start symbol: an input embedding row past the output classes."""
        return self.num_classes

    def fold(self, text: str) -> str:
        """``text`` as this alphabet reads it: lower-cased unless case-sensitive, other symbols dropped."""
        if not self.case_sensitive:
            text = text.lower()
        return "".join(c for c in text if c in self._index)

    def dropped(self, text: str) -> int:
        """How many characters of ``text`` ``fold`` drops (case changes are not drops)."""
        return len(text) - len(self.fold(text))

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Class ids of ``fold(text)`` followed by EOS; with ``max_len``, cut to ``max_len - 1`` plus EOS."""
        ids = [self._index[c] for c in self.fold(text)]
        if max_len is not None:
            ids = ids[: max_len - 1]
        return ids + [EOS]

    def decode(self, ids: list[int]) -> str:
        """Text of a class-id sequence, stopping at the first EOS; PAD and the start symbol are dropped."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if _SPECIALS <= i < self.num_classes:
                out.append(self.symbols[i - _SPECIALS])
        return "".join(out)

    def describe(self) -> str:
        """One canonical line (part of the model fingerprint, so edges that disagree are refused)."""
        return f"alphabet {self.name} case_sensitive={self.case_sensitive} symbols={self.symbols!r}"


ALPHABETS: dict[str, Alphabet] = {
    # The paper's evaluation alphabet and the clovaai benchmark's default: case-insensitive
    # digits and letters.
    "alnum36": Alphabet("alnum36", string.digits + string.ascii_lowercase, case_sensitive=False),
    # Case-sensitive letters, digits and ASCII punctuation.
    "printable94": Alphabet("printable94", PRINTABLE, case_sensitive=True),
}
DEFAULT_ALPHABET = "alnum36"


def get_alphabet(name: str) -> Alphabet:
    """The alphabet called ``name``. Raises ValueError listing the valid names."""
    try:
        return ALPHABETS[name]
    except KeyError:
        raise ValueError(f"unknown alphabet {name!r}; valid alphabets: {', '.join(ALPHABETS)}") from None


def out_of_vocabulary(text: str) -> set[str]:
    """Characters of ``text`` that no alphabet can represent (outside printable ASCII)."""
    return set(text) - set(PRINTABLE)
