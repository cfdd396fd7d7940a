"""Model files: the packed (keyed, shuffled) flat state plus the preset and gamma that rebuild it.

A model file holds no key and no layer names: without the federation key its vector is a shuffled
bag of floats, and even with the preset known the index maps cannot be rebuilt.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from recognizer import state
from recognizer.model import PRESETS, Recognizer, build_model, same_weights

FORMAT = "fedocr-model/2"  # 2: the alphabet is recorded, class ids start with EOS and PAD


class ModelFileError(ValueError):
    """A model file is missing, malformed, or belongs to another federation key."""


def save_model(
    path: Path, model: Recognizer, key: bytes, preset: str, fingerprint: bytes, extra: dict | None = None
) -> None:
    """Write ``model``'s packed state and the settings that rebuild it to ``path`` (.npz).

    ``fingerprint`` is ``state.fingerprint`` of the model as built (W_0), taken by the caller
    before training so that saving never rebuilds the network. ``extra``: more metadata (for
    instance the image key a transformed model reads), kept beside the settings.
    """
    path = Path(path)
    meta = {
        "format": FORMAT,
        "preset": preset,
        "gamma": model.gamma,
        "alphabet": model.alphabet.name,
        "fingerprint": fingerprint.hex(),
        **(extra or {}),
    }
    packed = state.pack_model(model, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then renamed over it: a crash leaves the old file or none, never half.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), state=packed)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_file(path: Path) -> tuple[dict, np.ndarray]:
    """The metadata and packed vector of a model file. Raises ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            packed = np.asarray(npz["state"], dtype=np.float32)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: not a FedOCR model file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: unknown model format {found!r}, expected {FORMAT}")
    gamma = meta.get("gamma", "")
    if (
        not isinstance(meta.get("preset"), str)
        or not isinstance(meta.get("alphabet"), str)
        or not isinstance(meta.get("fingerprint"), str)
        or not (gamma is None or (isinstance(gamma, int | float) and 0 < gamma <= 1))
        or packed.ndim != 1
    ):
        raise ModelFileError(f"{path}: malformed model file (preset, gamma, alphabet, fingerprint or state)")
    return meta, packed


def model_from_packed(
    preset: str, gamma: float | None, key: bytes, packed: np.ndarray, alphabet: str | None = None
) -> tuple[Recognizer, bytes]:
    """Rebuild the network for ``preset``/``gamma``/``alphabet`` under ``key`` and load a packed state.

    Returns the model and the fingerprint of its initial weights under ``key``.
    """
    model = build_model(preset, key, gamma, alphabet)
    fingerprint = state.fingerprint(model, key)  # of W_0, before the state replaces it
    lengths = state.state_lengths(model)
    if packed.size != sum(lengths):
        raise ModelFileError(
            f"state has {packed.size} values but preset {preset} at gamma {gamma} needs {sum(lengths)}"
        )
    state.load_packed(model, packed, key)
    return model, fingerprint


def start_from(model: Recognizer, path: Path, key: bytes, preset: str, fingerprint: bytes) -> None:
    """Load a model file's weights into ``model`` as built (W_0 under ``key``), to fine-tune it.

    ``fingerprint`` is ``state.fingerprint`` of the model as built, which the caller keeps anyway.
    The file must hold the same gamma and alphabet and a preset of the same weights (the same
    preset, or one that reads another image size: ``same_weights``), made under the same key (its
    fingerprint is of the same W_0). Raises ModelFileError naming the file otherwise.
    """
    meta, packed = read_model_file(path)
    ours = {"preset": preset, "gamma": model.gamma, "alphabet": model.alphabet.name}
    if meta.get("preset") in PRESETS and same_weights(meta["preset"], preset):
        ours["preset"] = meta["preset"]
    if differ := [f"{k} {meta.get(k)!r} (here {v!r})" for k, v in ours.items() if meta.get(k) != v]:
        raise ModelFileError(f"{path}: cannot start from it: {', '.join(differ)}")
    if fingerprint.hex() != meta["fingerprint"]:
        raise ModelFileError(f"{path}: made under another federation key (fingerprint mismatch)")
    if packed.size != (length := sum(state.state_lengths(model))):
        raise ModelFileError(f"{path}: state has {packed.size} values, this model {length}")
    state.load_packed(model, packed, key)


def load_model(
    path: Path, key: bytes, *, verify_key: bool = True, device: torch.device | str | None = None
) -> tuple[Recognizer, dict]:
    """Load a model file with the federation key; returns (model in eval mode, metadata).

    With ``verify_key`` (default) a file made under another key is refused; without it the file
    loads anyway and the network reads garbage, which is the point of the keyed hashing. The model
    is built on the CPU and then moved to ``device`` (None: stays on the CPU).
    """
    meta, packed = read_model_file(path)
    try:
        model, fingerprint = model_from_packed(meta["preset"], meta["gamma"], key, packed, meta["alphabet"])
    except ValueError as exc:  # an unknown preset, a state of the wrong size: name the file
        raise ModelFileError(f"{path}: {exc}") from exc
    if verify_key and fingerprint.hex() != meta["fingerprint"]:
        raise ModelFileError(f"{path}: made under another federation key (fingerprint mismatch)")
    if meta.get("token_order") is not None:  # a model transformed for scrambled blocks (image_crypt.py)
        order = torch.tensor(meta["token_order"], dtype=torch.long)
        own = getattr(model.encoder, "token_order", None)
        is_permutation = own is not None and torch.equal(order.sort().values, torch.arange(len(own)))
        if not is_permutation:
            raise ModelFileError(f"{path}: malformed token_order for preset {meta['preset']}")
        own.copy_(order)
    if device is not None:
        model.to(device)
    model.eval()
    return model, meta
