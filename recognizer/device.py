"""Where the model runs: ``--device auto|cpu|cuda``, and the defaults that follow from it.

torch is imported inside the functions, so the CLIs can build their parsers from DEVICES cheaply.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
MAX_CUDA_WORKERS = 8
WORKERS_HELP = f"data-loading processes (default: 0 on cpu, min({MAX_CUDA_WORKERS}, CPU cores) on cuda)"


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when ``torch.cuda.is_available()``, else cpu; ``cpu``; ``cuda`` (the current GPU).

    Raises:
        ValueError: ``cuda`` is asked for and no CUDA device is available, or an unknown name.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: no CUDA device is available (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                "use --device cpu or auto"
            )
        return torch.device("cuda")
    raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")


def default_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is on when not chosen: on a CUDA device that supports bfloat16, else off."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes when not chosen: enough to feed a GPU, none on the CPU."""
    return min(MAX_CUDA_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0
