"""Labels of the synthetic renderer: the word lists and the label kinds a data set is drawn from."""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable

from recognizer.charset import MAX_LABEL_LEN, out_of_vocabulary

# Longest dictionary word of the ``words`` label kind: most scene-text words are far shorter.
MAX_WORD_LEN = 10
# The ``long`` kind: the words the ``words`` kind never draws, up to the decoder's longest label.
LONG_WORD_LEN = (11, MAX_LABEL_LEN)
# Punctuation the ``mixed`` and ``general`` kinds write (prices, times, quotes, compounds).
LABEL_PUNCTUATION = "$.:%,-!'()?\"#&"
_WRAPS = ("{}.", "{}!", "{}'s", "({})", "{},", "{}?", '"{}"', "#{}", "{}-{}", "{}&{}")


@functools.cache
def dictionary_words() -> tuple[str, ...]:
    """Sorted English words (web2 list) that the vocabulary can spell, at most MAX_LABEL_LEN long."""
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=False)
    return tuple(sorted(w for w in words if 0 < len(w) <= MAX_LABEL_LEN and not out_of_vocabulary(w)))


@functools.cache
def short_words() -> tuple[str, ...]:
    """Dictionary words of letters only, 1 to MAX_WORD_LEN long (sorted, as dictionary_words)."""
    return tuple(w for w in dictionary_words() if len(w) <= MAX_WORD_LEN and w.isalpha())


@functools.cache
def long_words() -> tuple[str, ...]:
    """Dictionary words of letters only, LONG_WORD_LEN[0] to LONG_WORD_LEN[1] long (sorted)."""
    low, high = LONG_WORD_LEN
    return tuple(w for w in dictionary_words() if low <= len(w) <= high and w.isalpha())


def _number(rng: random.Random) -> str:
    n = rng.randrange(10 ** rng.randint(1, 6))
    form = rng.randrange(8)
    if form == 0:
        return f"${n % 1000}.{rng.randrange(100):02d}"
    if form == 1:
        return f"{rng.randrange(24)}:{rng.randrange(60):02d}"
    if form == 2:
        return f"{n % 101}%"
    if form == 3:
        return f"{n:,}"
    if form == 4:
        return f"{rng.randrange(100, 1000)}-{rng.randrange(10000):04d}"
    return str(n)


def _code(rng: random.Random, longest: int = 10) -> str:
    alphabet = rng.choice((string.ascii_uppercase + string.digits, string.ascii_letters + string.digits))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest)))


def sample_label(rng: random.Random) -> str:
    """A random label: mostly dictionary words in varied case, plus codes, numbers and punctuation.

    Every label is non-empty, in the vocabulary and at most MAX_LABEL_LEN characters.
    """
    kind = rng.random()
    if kind < 0.12:  # random alphanumeric code
        return _code(rng)
    if kind < 0.24:
        return _number(rng)
    word = rng.choice(dictionary_words())
    case = rng.random()
    if case < 0.15:
        word = word.upper()
    elif case < 0.35:
        word = word.capitalize()
    elif case < 0.55:
        word = word.lower()
    if kind < 0.32:  # word with punctuation
        joined = rng.choice(_WRAPS).format(word, rng.choice(dictionary_words()).lower())  # extra args ignored
        if len(joined) <= MAX_LABEL_LEN:
            word = joined
    return word


def sample_digits(rng: random.Random) -> str:
    """A string of 1 to 8 digits, uniformly random (house numbers, prices, codes: no language model helps)."""
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 8)))


def _cased(word: str, rng: random.Random) -> str:
    case = rng.random()
    if case < 0.2:
        return word.upper()
    return word.capitalize() if case < 0.5 else word.lower()


def sample_word(rng: random.Random) -> str:
    """A dictionary word of 1 to MAX_WORD_LEN letters: 20% upper case, 30% capitalized, 50% lower."""
    return _cased(rng.choice(short_words()), rng)


def sample_long(rng: random.Random) -> str:
    """A dictionary word of 11 to 25 letters (LONG_WORD_LEN), cased as ``sample_word``."""
    return _cased(rng.choice(long_words()), rng)


def _word(rng: random.Random) -> str:
    # Realistic lengths: mostly short words, some of any length up to MAX_LABEL_LEN.
    return rng.choice(short_words() if rng.random() < 0.7 else dictionary_words())


def _with_number(word: str, rng: random.Random) -> str:
    digits = str(rng.randrange(10 ** rng.randint(1, 4)))
    form = rng.randrange(4)
    if form == 0:
        return word + digits  # route66, mp3
    if form == 1:
        return digits + word  # 4th, 24h, 3D
    if form == 2:
        return f"{word}-{digits}"
    cut = rng.randint(1, max(1, len(word) - 1))
    return word[:cut] + digits + word[cut:]  # b12c, covid19x


def _title(text: str) -> str:
    # str.title() would also capitalise after an apostrophe or a digit ("It'S", "3D" -> "3D", "B12C").
    return "-".join(part[:1].upper() + part[1:].lower() for part in text.split("-"))


def sample_general(rng: random.Random) -> str:
    """A label of realistic length and form: words of up to 25 letters in any case, compounds with
    hyphens and apostrophes, numbers inside words, plain numbers and codes. At most MAX_LABEL_LEN.
    """
    kind = rng.random()
    if kind < 0.08:
        return _code(rng, 12)
    if kind < 0.18:
        return _number(rng)
    word = _word(rng)
    if kind < 0.32:  # hyphenated compound
        word = f"{word}-{rng.choice(short_words())}"
    elif kind < 0.40:  # apostrophe: possessive, contraction or elision
        word = rng.choice(("{}'s", "{}'t", "{}'ll", "{}'re", "{}'d", "o'{}", "{}s'", "l'{}")).format(word)
    elif kind < 0.52:
        word = _with_number(word, rng)
    case = rng.random()  # all caps and title case as often as signs and headings use them
    if case < 0.25:
        word = word.upper()
    elif case < 0.5:
        word = _title(word)
    elif case < 0.9:
        word = word.lower()
    if rng.random() < 0.08:
        word = rng.choice(_WRAPS[:8]).format(word)
    return word if len(word) <= MAX_LABEL_LEN else word[:MAX_LABEL_LEN].rstrip("-'")


# What a data set's labels are drawn from; each kind's alphabet is what its fonts must draw.
LABEL_KINDS: dict[str, Callable[[random.Random], str]] = {
    "mixed": sample_label, "words": sample_word, "digits": sample_digits,
    "general": sample_general, "long": sample_long,
}
_TEXT = string.ascii_letters + string.digits + LABEL_PUNCTUATION
KIND_ALPHABETS: dict[str, str] = {
    "mixed": _TEXT, "words": string.ascii_letters, "digits": string.digits,
    "general": _TEXT, "long": string.ascii_letters,
}
