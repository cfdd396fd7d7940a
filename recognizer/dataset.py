"""Training data: word-image LMDBs as torch tensors and a DataLoader over them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from recognizer import charset
from recognizer.charset import MAX_SEQ_LEN
from recognizer.lmdb_data import LABEL_KEY, DatasetError, LmdbReader, sample_key

logger = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, torch.Tensor, str]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def check_vocabulary(reader: LmdbReader, max_len: int | None = None) -> None:
    """Raise if any label holds a character outside the vocabulary; log how many ``max_len`` cuts.

    Raises:
        DatasetError: naming the path, every offending character and the first offending key.
    """
    bad: set[str] = set()
    first, offending, too_long = None, 0, 0
    for i in range(len(reader)):
        label = reader.get_label(i)
        too_long += max_len is not None and len(label) > max_len - 1
        missing = charset.out_of_vocabulary(label)
        if missing:
            bad |= missing
            offending += 1
            first = first or sample_key(LABEL_KEY, i + 1).decode()
    if too_long:
        logger.warning("%s: %d label(s) longer than %d characters; targets are cut", reader.path,
                       too_long, max_len - 1)
    if bad:
        chars = " ".join(repr(c) for c in sorted(bad))
        raise DatasetError(
            f"{reader.path}: {offending} label(s) hold characters outside the vocabulary: {chars}; "
            f"first at key {first!r}"
        )


class WordDataset(Dataset):
    """Samples of a word-image LMDB as ``(image, target, label)``.

    ``image`` is float32 ``[3, H, W]`` in ``[-1, 1]``, resized to ``input_hw`` without keeping the
    aspect ratio (as ASTER does); ``target`` is int64 ``[max_len]``: ``charset.encode(label,
    max_len)`` padded with PAD; ``label`` is the stored label, case preserved. The LMDB opens
    lazily in whichever process reads first, so DataLoader workers each open their own.

    Raises:
        DatasetError: the LMDB cannot be read; with ``check_labels``, a label is outside the
            vocabulary.
    """

    def __init__(
        self,
        path: Path,
        input_hw: tuple[int, int] = (64, 256),
        max_len: int = MAX_SEQ_LEN,
        check_labels: bool = False,
    ) -> None:
        if len(input_hw) != 2 or min(input_hw) < 1:
            raise ValueError(f"input_hw must be two positive ints, got {input_hw}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.reader = LmdbReader(Path(path))
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.max_len = max_len
        if check_labels:
            check_vocabulary(self.reader, max_len)
            self.reader.close()  # opened by the check; closed again before any worker forks

    def __len__(self) -> int:
        return len(self.reader)

    def encode_target(self, label: str) -> torch.Tensor:
        """int64 ``[max_len]``: class ids of ``label`` and EOS, cut to ``max_len``, padded with PAD."""
        ids = charset.encode(label, self.max_len)
        return torch.tensor(ids + [charset.PAD] * (self.max_len - len(ids)), dtype=torch.int64)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """float32 ``[3, H, W]`` in ``[-1, 1]`` of an RGB image resized to ``input_hw``."""
        return image_to_tensor(image, self.input_hw)

    def __getitem__(self, index: int) -> Sample:
        image, label, _ = self.reader.get(index)
        return self.to_tensor(image), self.encode_target(label), label


def image_to_tensor(image: Image.Image, input_hw: tuple[int, int]) -> torch.Tensor:
    """float32 ``[3, H, W]`` in ``[-1, 1]`` of ``image`` resized to ``input_hw`` (aspect not kept)."""
    h, w = input_hw
    pixels = np.array(image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def load_image_file(path: Path, input_hw: tuple[int, int] = (64, 256)) -> torch.Tensor:
    """An image file as the model's input tensor. Raises DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            return image_to_tensor(image, input_hw)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such image file") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc


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
) -> DataLoader:
    """A DataLoader of ``WordDataset(path, ...)`` batches ``(images, targets, labels)``.

    Several paths are pooled into one dataset (the centralized manner). ``seed`` fixes the
    shuffle order, so the same seed gives the same batches.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ValueError("make_loader needs at least one LMDB path")
    parts = [WordDataset(p, input_hw=input_hw, max_len=max_len, check_labels=check_labels) for p in paths]
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
    )
