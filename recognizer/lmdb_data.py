"""Word-image LMDBs in the ASTER / clovaai layout: key names, a batching writer and a lazy reader."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType

import lmdb
from PIL import Image

logger = logging.getLogger(__name__)

# The on-disk format, shared by writer and reader. Sample keys count from 1, as in clovaai.
NUM_SAMPLES_KEY = b"num-samples"
IMAGE_KEY = "image-%09d"
LABEL_KEY = "label-%09d"
# Only this project writes style keys; other datasets lack them and read back style None.
STYLE_KEY = "style-%09d"
DATA_FILE = "data.mdb"

_INITIAL_MAP_SIZE = 64 << 20  # grown by doubling whenever a commit does not fit

# Read-only environments of this process by real path, with the pid that opened them.
_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


class DatasetError(ValueError):
    """A word-image LMDB is missing, malformed or holds an unreadable sample."""


def sample_key(pattern: str, index: int) -> bytes:
    """The key of 1-based sample ``index`` under ``pattern`` (IMAGE_KEY, LABEL_KEY or STYLE_KEY)."""
    return (pattern % index).encode("ascii")


class LmdbWriter:
    """Write samples to a new LMDB, committing in batches and growing the map as needed.

    Use as a context manager; ``num-samples`` is written when the block exits without error.
    """

    def __init__(
        self, path: Path, *, commit_every: int = 1000, overwrite: bool = False, map_size: int = 0
    ) -> None:
        self.path = Path(path)
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        if (self.path / DATA_FILE).exists():
            if not overwrite:
                raise DatasetError(f"{self.path}: already holds an LMDB; refusing to overwrite")
            shutil.rmtree(self.path)
        elif self.path.exists() and not self.path.is_dir():
            raise DatasetError(f"{self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._commit_every = commit_every
        self._map_size = map_size or _INITIAL_MAP_SIZE
        self._env: lmdb.Environment | None = lmdb.open(
            str(self.path), map_size=self._map_size, subdir=True, meminit=False
        )
        self._pending: list[tuple[bytes, bytes]] = []
        self.count = 0

    def add(self, image: bytes, label: str, style: str | None = None) -> int:
        """Queue one sample (encoded image bytes, UTF-8 label, optional style); return its 1-based key."""
        if self._env is None:
            raise DatasetError(f"{self.path}: writer is closed")
        self.count += 1
        self._pending.append((sample_key(IMAGE_KEY, self.count), bytes(image)))
        self._pending.append((sample_key(LABEL_KEY, self.count), label.encode("utf-8")))
        if style is not None:
            self._pending.append((sample_key(STYLE_KEY, self.count), style.encode("utf-8")))
        if self.count % self._commit_every == 0:
            self._flush()
        return self.count

    def _flush(self, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        items = self._pending + (extra or [])
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self._map_size *= 2
                logger.debug("%s: growing map to %d bytes", self.path, self._map_size)
                self._env.set_mapsize(self._map_size)
        self._pending = []

    def close(self) -> None:
        """Commit what is queued, write ``num-samples`` and close the environment."""
        if self._env is None:
            return
        self._flush([(NUM_SAMPLES_KEY, str(self.count).encode("ascii"))])
        self._env.close()
        self._env = None

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._env is not None:
            # Leave no num-samples behind, so a half-written set cannot be read as complete.
            self._env.close()
            self._env = None


class LmdbReader:
    """Read-only access to a word-image LMDB; the environment opens lazily, once per process.

    Indices are 0-based: ``get(i)`` reads keys ``image-%09d`` / ``label-%09d`` at ``i + 1``.
    Environments live in a per-process table, never in the reader, so a reader pickles cleanly
    and each DataLoader worker opens its own.

    Raises:
        DatasetError: the path is missing or is not an LMDB, or ``num-samples`` is absent.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"{self.path}: no such dataset")
        if not (self.path / DATA_FILE).is_file():
            raise DatasetError(f"{self.path}: not an LMDB directory (no {DATA_FILE})")
        self._key_path = os.path.realpath(self.path)
        opened_here = self._key_path not in _ENVS
        try:
            self._len = self._read_count()
        finally:
            if opened_here:
                self.close()  # nothing stays open before a DataLoader forks its workers

    def _open(self) -> lmdb.Environment:
        # py-lmdb allows one environment per path and process, so readers of a path share it.
        pid, env = _ENVS.get(self._key_path, (-1, None))
        if env is not None and pid != os.getpid():
            # Inherited through fork from a parent that had it open: py-lmdb refuses a second open
            # until this copy is closed, and closing a read-only, lock-free copy leaves the parent's alone.
            env.close()
            env = None
        if env is None:
            try:
                env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False)
            except lmdb.Error as exc:
                raise DatasetError(f"{self.path}: cannot open as LMDB: {exc}") from exc
            try:
                self._check_size(env)
            except BaseException:
                env.close()
                raise
            _ENVS[self._key_path] = (os.getpid(), env)
        return env

    def _check_size(self, env: lmdb.Environment) -> None:
        """Refuse a data file shorter than its last page: reading a page past the end of the
        mapped file would kill the process (SIGBUS) instead of raising."""
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = (self.path / DATA_FILE).stat().st_size
        if size < needed:
            raise DatasetError(f"{self.path}: {DATA_FILE} is truncated ({size} bytes of {needed})")

    def _read_count(self) -> int:
        raw = self._get(NUM_SAMPLES_KEY)
        if raw is None:
            raise DatasetError(f"{self.path}: key {NUM_SAMPLES_KEY.decode()!r} missing")
        try:
            count = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"{self.path}: key 'num-samples' is not an integer: {raw[:20]!r}") from exc
        if count < 0:
            raise DatasetError(f"{self.path}: key 'num-samples' is negative ({count})")
        return count

    def _get(self, key: bytes) -> bytes | None:
        try:
            with self._open().begin(write=False, buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as exc:
            raise DatasetError(f"{self.path}: corrupt LMDB reading key {key.decode()!r}: {exc}") from exc

    def close(self) -> None:
        """Close this process's environment for the path (any reader of it reopens on its next read)."""
        pid, env = _ENVS.pop(self._key_path, (-1, None))
        if env is not None and pid == os.getpid():
            env.close()

    def __len__(self) -> int:
        return self._len

    def _key(self, pattern: str, index: int) -> bytes:
        if not 0 <= index < self._len:
            raise IndexError(f"{self.path}: index {index} out of range for {self._len} samples")
        return sample_key(pattern, index + 1)

    def get_raw(self, index: int) -> tuple[bytes, str, str | None]:
        """Encoded image bytes, label and style (None when absent) of sample ``index``."""
        ikey, lkey, skey = (self._key(p, index) for p in (IMAGE_KEY, LABEL_KEY, STYLE_KEY))
        try:
            with self._open().begin(write=False, buffers=False) as txn:
                image, label, style = txn.get(ikey), txn.get(lkey), txn.get(skey)
        except lmdb.Error as exc:
            raise DatasetError(f"{self.path}: corrupt LMDB reading sample {index}: {exc}") from exc
        for key, value in ((ikey, image), (lkey, label)):
            if value is None:
                raise DatasetError(f"{self.path}: key {key.decode()!r} missing")
        try:
            return image, label.decode("utf-8"), None if style is None else style.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.path}: key {lkey.decode()!r} or its style is not UTF-8") from exc

    def get_label(self, index: int) -> str:
        """Label of sample ``index`` without reading its image."""
        key = self._key(LABEL_KEY, index)
        raw = self._get(key)
        if raw is None:
            raise DatasetError(f"{self.path}: key {key.decode()!r} missing")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.path}: key {key.decode()!r} is not UTF-8") from exc

    def get_style(self, index: int) -> str | None:
        """Style family of sample ``index``, or None when the dataset does not record one."""
        raw = self._get(self._key(STYLE_KEY, index))
        return None if raw is None else raw.decode("utf-8", errors="replace")

    def get(self, index: int) -> tuple[Image.Image, str, str | None]:
        """Decoded RGB image, label and style (None when absent) of sample ``index``.

        Raises:
            DatasetError: a key is missing or the image bytes do not decode.
            IndexError: ``index`` is outside ``[0, len)``.
        """
        raw, label, style = self.get_raw(index)
        try:
            with Image.open(io.BytesIO(raw)) as img:
                return img.convert("RGB"), label, style
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            key = sample_key(IMAGE_KEY, index + 1).decode()
            raise DatasetError(f"{self.path}: key {key!r} is not a decodable image: {exc}") from exc
