"""The federation key: 32 random bytes in a file that only edges hold, and HKDF derivations from it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


class KeyFileError(ValueError):
    """A federation key file is missing, unreadable or of the wrong size."""


def generate_key(path: Path) -> bytes:
    """Write 32 fresh random bytes to ``path`` (mode 0600, never overwriting) and return them."""
    return write_key(path, os.urandom(KEY_BYTES))


def write_key(path: Path, key: bytes) -> bytes:
    """Write ``key`` to a new file ``path`` (mode 0600, never overwriting) and return it."""
    path = Path(path)
    if len(key) != KEY_BYTES:
        raise ValueError(f"federation key must be {KEY_BYTES} bytes, got {len(key)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a federation key") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def load_key(path: Path) -> bytes:
    """Read a federation key file. Raises KeyFileError naming the file when it is unusable."""
    path = Path(path)
    try:
        key = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such federation key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read federation key: {exc.strerror}") from exc
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: a federation key is {KEY_BYTES} bytes, this file has {len(key)}")
    return key


def derive(key: bytes, label: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of the federation key for one purpose, named by ``label`` (never sent)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"federation key must be {KEY_BYTES} bytes, got {len(key)}")
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=b"fedocr-v1", info=label.encode()
    ).derive(key)


def derive_seed(key: bytes, label: str) -> int:
    """A 63-bit integer seed for ``label`` (a layer's index map, an initializer, the packing shuffle)."""
    return int.from_bytes(derive(key, label, 8), "little") >> 1
