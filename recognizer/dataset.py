"""Training data: word-image LMDBs as torch tensors (augmented on the fly when asked) and a DataLoader."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, get_worker_info

from recognizer import charset
from recognizer.augment import AugmentConfig, augment
from recognizer.charset import DEFAULT_ALPHABET, MAX_SEQ_LEN, Alphabet, get_alphabet
from recognizer.lmdb_data import DatasetError, LmdbReader

logger = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, torch.Tensor, str]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


@dataclass(frozen=True)
class LabelReport:
    """How a dataset's labels fold to an alphabet (see ``Alphabet.fold``)."""

    path: str
    alphabet: str
    labels: int
    folded: int  # labels that lost at least one character outside the alphabet
    dropped_chars: int  # characters dropped in all
    emptied: int  # labels left with no character (they train the model to read nothing)
    too_long: int  # labels cut to max_len - 1 characters

    def describe(self) -> str:
        """One line for logs and CLIs."""
        return (f"{self.path}: {self.labels} labels; {self.folded} lose characters outside {self.alphabet} "
                f"({self.dropped_chars} dropped, {self.emptied} left empty); {self.too_long} cut to length")


def label_report(reader: LmdbReader, alphabet: Alphabet, max_len: int | None = None) -> LabelReport:
    """Read every label and count what folding to ``alphabet`` (and cutting to ``max_len``) changes.

    Never raises for a label's content: symbols outside the alphabet are dropped when the label is
    read. Logs a warning when anything is dropped or cut.

    Raises:
        DatasetError: a label key is missing or not UTF-8.
    """
    folded = dropped = emptied = too_long = 0
    for i in range(len(reader)):
        label = reader.get_label(i)
        lost = alphabet.dropped(label)
        folded += lost > 0
        dropped += lost
        kept = len(label) - lost
        emptied += kept == 0
        too_long += max_len is not None and kept > max_len - 1
    report = LabelReport(str(reader.path), alphabet.name, len(reader), folded, dropped, emptied, too_long)
    if folded or too_long:
        logger.warning("%s", report.describe())
    return report


class WordDataset(Dataset):
    """Samples of a word-image LMDB as ``(image, target, label)``.

    ``image`` is float32 ``[3, H, W]`` in ``[-1, 1]``, resized to ``input_hw`` (see
    ``image_to_tensor`` for ``keep_aspect``); ``target`` is int64 ``[max_len]``: ``alphabet.encode(label,
    max_len)`` (the label folded to the alphabet) padded with PAD; ``label`` is the stored label.
    The LMDB opens lazily in whichever process reads first, so DataLoader workers each open their own.

    With ``augment``, each image is changed at random after resizing (``recognizer.augment``), by a
    generator seeded from ``augment_seed`` and, in a DataLoader worker, the worker's own seed (which
    torch draws from the loader's generator): the same seeds and worker count give the same images.

    Raises:
        DatasetError: the LMDB cannot be read (with ``check_labels``: any of its labels).
    """

    def __init__(
        self,
        path: Path,
        input_hw: tuple[int, int] = (64, 256),
        max_len: int = MAX_SEQ_LEN,
        check_labels: bool = False,
        alphabet: Alphabet | str = DEFAULT_ALPHABET,
        keep_aspect: bool = False,
        augment: AugmentConfig | None = None,
        augment_seed: tuple[int, ...] = (0,),
    ) -> None:
        if len(input_hw) != 2 or min(input_hw) < 1:
            raise ValueError(f"input_hw must be two positive ints, got {input_hw}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.reader = LmdbReader(Path(path))
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.max_len = max_len
        self.keep_aspect = keep_aspect
        self.alphabet = get_alphabet(alphabet) if isinstance(alphabet, str) else alphabet
        self.label_report: LabelReport | None = None
        self.augment = augment
        self.augment_seed = tuple(augment_seed)
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int | None] | None = None
        if check_labels:
            self.label_report = label_report(self.reader, self.alphabet, max_len)
            self.reader.close()  # opened by the check; closed again before any worker forks

    def __len__(self) -> int:
        return len(self.reader)

    def encode_target(self, label: str) -> torch.Tensor:
        """int64 ``[max_len]``: class ids of the folded ``label`` and EOS, cut to ``max_len``, padded."""
        ids = self.alphabet.encode(label, self.max_len)
        return torch.tensor(ids + [charset.PAD] * (self.max_len - len(ids)), dtype=torch.int64)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """float32 ``[3, H, W]`` in ``[-1, 1]`` of an RGB image resized to ``input_hw``."""
        return image_to_tensor(image, self.input_hw, self.keep_aspect)

    def _augment_rng(self) -> np.random.Generator:
        # One generator per process and worker, made on first use: a forked worker must not carry on
        # its parent's stream, which every sibling would repeat.
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.id)
        if self._rng is None or self._rng_owner != owner:
            entropy = [*self.augment_seed] + ([] if info is None else [info.seed])
            self._rng, self._rng_owner = np.random.default_rng(entropy), owner
        return self._rng

    def __getitem__(self, index: int) -> Sample:
        image, label, _ = self.reader.get(index)
        if self.augment is None:
            return self.to_tensor(image), self.encode_target(label), label
        pixels = image_to_array(image, self.input_hw, self.keep_aspect)
        pixels = augment(pixels, self.augment, self._augment_rng())
        return array_to_tensor(pixels), self.encode_target(label), label


def image_to_tensor(image: Image.Image, input_hw: tuple[int, int], keep_aspect: bool = False) -> torch.Tensor:
    """float32 ``[3, H, W]`` in ``[-1, 1]`` of ``image`` resized to ``input_hw`` (see ``image_to_array``)."""
    return array_to_tensor(image_to_array(image, input_hw, keep_aspect))


def image_to_array(image: Image.Image, input_hw: tuple[int, int], keep_aspect: bool = False) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of ``image`` resized to ``input_hw``.

    Without ``keep_aspect`` the image is stretched to the size (as ASTER does). With it, the image
    is scaled to height H keeping its aspect ratio (squeezed only when wider than W) and its last
    column is repeated to width W, so characters keep about one width whatever the word's length.
    """
    h, w = input_hw
    image = image.convert("RGB")
    scaled_w = min(w, max(1, round(image.width * h / image.height))) if keep_aspect else w
    pixels = np.array(image.resize((scaled_w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    if scaled_w < w:
        pixels = np.concatenate([pixels, np.repeat(pixels[:, -1:], w - scaled_w, axis=1)], axis=1)
    return pixels


def array_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """float32 ``[3, H, W]`` in ``[-1, 1]`` of uint8 ``pixels`` ``[H, W, 3]``."""
    pixels = np.require(pixels, np.uint8, ["C", "W"])  # a copy only of a read-only or strided array
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def load_image_array(
    path: Path, input_hw: tuple[int, int] = (64, 256), keep_aspect: bool = False
) -> np.ndarray:
    """An image file resized as the model reads it, uint8 [H, W, 3] (``image_to_array``). Raises
    DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            return image_to_array(image, input_hw, keep_aspect)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such image file") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc


def load_image_file(
    path: Path, input_hw: tuple[int, int] = (64, 256), keep_aspect: bool = False
) -> torch.Tensor:
    """An image file as the model's input tensor. Raises DatasetError naming the file."""
    return array_to_tensor(load_image_array(path, input_hw, keep_aspect))


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into ``(images [B, 3, H, W] float32, targets [B, T] int64, labels)``.

    T is the batch's longest label plus EOS, not max_len: the decoder runs one step per position,
    so padding columns that every row ignores would only cost time.
    """
    images, targets, labels = zip(*samples, strict=True)
    stacked = torch.stack(targets)  # [B, max_len]
    used = int((stacked != charset.PAD).sum(1).max())
    return torch.stack(images), stacked[:, :used], list(labels)


def make_loader(
    path: Path | Sequence[Path],
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    *,
    input_hw: tuple[int, int] = (64, 256),
    max_len: int = MAX_SEQ_LEN,
    check_labels: bool = False,
    pin_memory: bool = False,
    alphabet: Alphabet | str = DEFAULT_ALPHABET,
    keep_aspect: bool = False,
    augment: AugmentConfig | None = None,
    take: Sequence[int | None] | None = None,
) -> DataLoader:
    """A DataLoader of ``WordDataset(path, ...)`` batches ``(images, targets, labels)``.

    Several paths are pooled into one dataset (the centralized manner); ``take[i]`` images of the
    i-th (None: all), drawn at random by ``seed``. ``seed`` fixes the
    shuffle order, so the same seed gives the same batches. ``pin_memory`` (for a CUDA model)
    returns page-locked batches, which copy to the GPU asynchronously. ``augment`` changes every
    training image at random (``WordDataset``), seeded from ``seed`` and the part's position.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ValueError("make_loader needs at least one LMDB path")
    parts = [
        WordDataset(p, input_hw, max_len, check_labels, alphabet, keep_aspect, augment, (seed, i))
        for i, p in enumerate(paths)
    ]
    if take is not None:
        if len(take) != len(parts):
            raise ValueError(f"take names {len(take)} counts for {len(parts)} datasets")
        draw = torch.Generator().manual_seed(seed + 7_919)
        parts = [
            p if n is None or n >= len(p) else Subset(p, torch.randperm(len(p), generator=draw)[:n].tolist())
            for p, n in zip(parts, take, strict=True)
        ]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )
