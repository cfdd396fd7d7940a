"""Encrypted training data on an edge (`edge_agent --image-key`): the edge encrypts its shard, its
held-out set and any warm-up words with the federation's common image key before training, and its
model is aligned to that key (recognizer.image_crypt.align_model), so it reads them as the plain model
reads plain images and its uploads keep their plain meaning.

Each set is encrypted once into the work directory (named by what it was made from) and reused after a
restart; an interrupted encryption is redone, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from recognizer.image_crypt import (
    BlockCipher,
    EncryptionOptions,
    cipher_for_preset,
    encrypt_dataset,
    image_key_fingerprint,
)
from recognizer.lmdb_data import LmdbReader
from recognizer.model import resolve_preset


@dataclass(frozen=True)
class ImageEncryption:
    """The image key (by fingerprint), its transforms and the preset whose input the images are cut to."""

    cipher: BlockCipher
    key_name: str
    transforms: str
    preset: str

    @classmethod
    def load(cls, key: bytes, preset: str, transforms: str = "all") -> ImageEncryption:
        """Raises ValueError for a preset without a patch embedding or unknown transforms."""
        options = EncryptionOptions.parse(transforms)
        cipher = cipher_for_preset(key, preset, options)
        return cls(cipher, image_key_fingerprint(key), options.describe(), preset)

    def copy_of(self, source: Path, work_dir: Path) -> Path:
        """The encrypted copy of the LMDB ``source`` under ``work_dir`` (made now if missing)."""
        spec = {"source": os.path.realpath(source), "samples": len(LmdbReader(source)), "key": self.key_name,
                "transforms": self.transforms, "preset": self.preset}  # fmt: skip
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        out = work_dir / f"encrypted-{Path(source).name}-{digest}"
        if (out / "data.mdb").exists():
            return out
        partial = work_dir / f".encrypted-{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        config = resolve_preset(self.preset)
        encrypt_dataset(Path(source), partial, self.cipher, config.input_hw, config.keep_aspect)
        partial.rename(out)
        return out
