"""Fonts of the synthetic renderer: where faces are found, their families, glyph coverage, the held-out split.

Faces come from four sources, in this order (where two offer one family and style, the first wins):
any directory a user names, the font packages of pyproject's ``recognizer`` extra, fonts other
installed Python packages ship (matplotlib's DejaVu, STIX, Computer Modern, ...), and the system's
font directories (Debian's ``fonts-*`` packages; ``make install`` adds a list of them where it can).
Faces are grouped into families by the family name inside the font; a family is held out of
training iff a hash of its normalised name falls below HELD_OUT_FRACTION, so the split does not
depend on which other fonts a machine has.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

from recognizer.charset import PRINTABLE

logger = logging.getLogger(__name__)

# The nine font packages the renderer has always drawn from (the ``classic`` font set); each ships
# its faces under <package>/files/.
FONT_PACKAGES: tuple[str, ...] = (
    "font_roboto", "font_source_sans_pro", "font_source_serif_pro", "font_caladea", "font_lato",
    "font_manrope", "font_hanken_grotesk", "font_fredoka_one", "font_amatic_sc",
)
# More font packages of the same layout, used by the family sets (train, held-out, all) only.
EXTRA_FONT_PACKAGES: tuple[str, ...] = ("font_intuitive", "font_fjallaone", "font_rhd")
SYSTEM_FONT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts")
SMALL_CAPS_MARK = "AmaticSC"  # classic faces whose lower case are small capitals
# Variable fonts duplicate the static faces; hairline weights vanish under blur, noise and downscaling.
_SKIPPED_FACES = ("Variable", "Thin", "ExtraLight", "UltraLight", "Hairline")
# Families whose ASCII code points draw something other than letters (symbols, dingbats, math
# extension pieces, keycaps, the placeholder boxes of a fallback font).
_EXCLUDED_FAMILIES = frozenset({
    "cmex10", "cmsy10", "d050000l", "standardsymbolsps", "lastresorthighefficiency",
    "linuxbiolinumkeyboardo", "berenisadfpromath",
})
# classic: the nine packages' faces, as the renderer always drew; train / held-out / all: the families of
# every source on either side of the split, or both; dirs: only the faces of the directories named.
FONT_SETS: tuple[str, ...] = ("classic", "train", "held-out", "all", "dirs")
# About a fifth of the families are held out. The salt is fixed; it was picked (the second tried) so
# that the families of every font package (the classic nine and three more) fall on the training side.
HELD_OUT_FRACTION = 0.2
_SPLIT_SALT = "fedocr-fonts-1"
_CACHE_VERSION = 1


class FontError(ValueError):
    """No usable font: an unknown font set, or none that covers the alphabet asked for."""


@dataclass(frozen=True)
class Face:
    """One font file: its family (as the font names it), style, source, and the characters it draws."""

    path: str
    family: str
    style: str
    source: str  # "package", "python", "system" or "dir"
    covered: str  # the characters of PRINTABLE it maps and draws with ink
    caps_only: bool  # lower-case letters drawn as capitals: labels are upper-cased


@dataclass(frozen=True)
class FontSet:
    """The families a renderer draws from, sorted by name, each with its faces sorted by path."""

    families: tuple[tuple[str, tuple[Face, ...]], ...]
    skipped: int  # faces of these families dropped for lacking a glyph of the alphabet


def family_key(family: str) -> str:
    """A family name normalised for the split: lower case, letters and digits only."""
    return "".join(c for c in family.lower() if c.isalnum())


def is_held_out(family: str) -> bool:
    """Whether ``family`` belongs to the held-out side of the fixed font split."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}/{family_key(family)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELD_OUT_FRACTION * 2**64


def _package_dirs(packages: tuple[str, ...]) -> list[Path]:
    dirs = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            logger.warning("font package %s is not installed", package)
            continue
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "files")
    return dirs


@functools.cache
def font_files() -> tuple[str, ...]:
    """Paths of the classic faces (FONT_PACKAGES), sorted (``.ttf``, or ``.otf`` where no ``.ttf``)."""
    found: list[str] = []
    for files in _package_dirs(FONT_PACKAGES):
        faces = sorted(files.glob("*.ttf")) or sorted(files.glob("*.otf"))
        found += [str(p) for p in faces if not any(mark in p.name for mark in _SKIPPED_FACES)]
    if not found:
        raise FontError(f"no fonts found in any of {', '.join(FONT_PACKAGES)}")
    return tuple(found)


def _walk(root: Path) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.lower().endswith((".ttf", ".otf"))]
    return sorted(found)


def candidate_files(font_dirs: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(path, source) of every ``.ttf``/``.otf`` file of every source, sources in order, paths sorted."""
    out = []
    for root in font_dirs:
        if not Path(root).is_dir():
            raise FontError(f"font directory {root} does not exist")
        out += [(p, "dir") for p in _walk(Path(root))]
    package_dirs = _package_dirs(FONT_PACKAGES + EXTRA_FONT_PACKAGES)
    out += [(p, "package") for d in package_dirs for p in _walk(d)]
    site = Path(sysconfig.get_paths()["purelib"])
    skip = {str(d) for d in package_dirs}
    out += [(p, "python") for p in _walk(site) if not any(p.startswith(s) for s in skip)]
    for root in SYSTEM_FONT_DIRS:
        out += [(p, "system") for p in _walk(Path(root).expanduser())]
    return out


def _inspect(path: str) -> tuple[str, str, str, bool] | None:
    """(family, style, covered characters, caps only) of one font file, or None when unreadable."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True, fontNumber=0) as tt:
            names = tt["name"]
            family = names.getDebugName(16) or names.getDebugName(1)
            style = names.getDebugName(17) or names.getDebugName(2) or "Regular"
            cmap = tt.getBestCmap() or {}
        font = ImageFont.truetype(path, 24)
    except Exception as exc:  # a broken or unsupported file is skipped, never fatal
        logger.info("skipping font %s: %s", path, exc)
        return None
    if not family:
        return None
    # Mapped is not enough: some fonts map a character to an empty glyph. Ink is checked by drawing it.
    covered = "".join(c for c in PRINTABLE if ord(c) in cmap and font.getmask(c).getbbox() is not None)
    caps_only = all(cmap.get(ord(c)) == cmap.get(ord(c.upper())) for c in string.ascii_lowercase)
    return family.strip(), style.strip(), covered, caps_only


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedocr" / f"fonts-v{_CACHE_VERSION}.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent writers leave one whole file
    except OSError as exc:
        logger.info("font cache not written: %s", exc)


@functools.cache
def all_faces(font_dirs: tuple[str, ...] = ()) -> tuple[Face, ...]:
    """Every usable face of every source: one per (family, style), the first source winning.

    Inspecting a face (names, cmap, ink) is cached on disk by path, size and modification time.
    """
    cache, dirty, faces, seen = _load_cache(), False, [], set()
    for path, source in candidate_files(font_dirs):
        if any(mark in Path(path).name for mark in _SKIPPED_FACES):
            continue
        stat = os.stat(path)
        key, stamp = os.path.realpath(path), [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(key)
        if entry is None or entry[0] != stamp:
            entry, dirty = [stamp, _inspect(path)], True
            cache[key] = entry
        if entry[1] is None:
            continue
        family, style, covered, caps_only = entry[1]
        if family_key(family) in _EXCLUDED_FAMILIES:
            continue
        if any(mark in style.replace(" ", "") for mark in _SKIPPED_FACES):
            continue
        ident = (family_key(family), family_key(style))
        if ident in seen:
            continue
        seen.add(ident)
        faces.append(Face(path, family, style, source, covered, caps_only or _is_small_caps(family)))
    if dirty:
        _save_cache(cache)
    return tuple(faces)


def _is_small_caps(family: str) -> bool:
    # Small capitals and titling faces draw every letter as a capital.
    key = family_key(family)
    return "SC" in family.replace("-", " ").split() or any(m in key for m in ("smallcaps", "titling"))


@functools.cache
def font_set(which: str, alphabet: str, font_dirs: tuple[str, ...] = ()) -> FontSet:
    """The families of font set ``which`` (FONT_SETS but ``classic``) whose faces draw ``alphabet``.

    Faces lacking a glyph of ``alphabet`` are skipped and counted. Raises FontError for an
    unknown set or when no family is left.
    """
    if which not in FONT_SETS[1:]:
        raise FontError(f"unknown font set {which!r}; choose from {', '.join(FONT_SETS)}")
    need = set(alphabet)
    by_family: dict[str, list[Face]] = {}
    skipped = 0
    for face in all_faces(font_dirs):
        held = is_held_out(face.family)
        if (which == "train" and held) or (which == "held-out" and not held):
            continue
        if which == "dirs" and face.source != "dir":
            continue
        if not need <= set(face.covered):
            skipped += 1
            continue
        by_family.setdefault(family_key(face.family), []).append(face)
    if not by_family:
        raise FontError(f"no font of set {which!r} draws every character of {alphabet!r}")
    families = tuple(
        (faces[0].family, tuple(sorted(faces, key=lambda f: f.path)))
        for _, faces in sorted(by_family.items())
    )
    logger.info("font set %s: %d families, %d faces skipped (missing glyphs)", which, len(families), skipped)
    return FontSet(families, skipped)
