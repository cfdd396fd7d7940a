"""Block-wise image encryption with an image key, and the model transformation that matches it: the
encryption is a bijection given the key, each transform does what it says, and a model transformed with
the key reads encrypted images with the logits the original gives the plain ones (every preset with a
patch embedding); through the real `recognizer` commands too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recognizer import state
from recognizer.dataset import array_to_tensor
from recognizer.image_crypt import (
    BlockCipher,
    EncryptionOptions,
    align_model,
    cipher_for_preset,
    encrypt_model,
    token_order_of,
)
from recognizer.keys import generate_key, load_key
from recognizer.model import PRESETS, build_model
from recognizer.model_io import load_model, read_model_file, save_model
from recognizer.synth import render_dataset

VIT_PRESETS = sorted(name for name, c in PRESETS.items() if c.encoder == "vit")
SINGLE = ("blocks", "pixels", "negate", "channels")
KEY, OTHER = b"\x01" * 32, b"\x02" * 32


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 128, 3), dtype=np.uint8)


@pytest.mark.parametrize("transforms", ["all", *SINGLE, "pixels,channels"])
def test_decrypting_with_the_key_gives_back_the_image_and_another_key_does_not(transforms: str) -> None:
    options = EncryptionOptions.parse(transforms)
    cipher, other = (BlockCipher.from_key(k, 8, (4, 16), options) for k in (KEY, OTHER))
    for x in _images():
        encrypted = cipher.encrypt(x)
        assert encrypted.shape == x.shape and encrypted.dtype == np.uint8
        assert not np.array_equal(encrypted, x)
        np.testing.assert_array_equal(cipher.decrypt(encrypted), x)
        assert not np.array_equal(other.decrypt(encrypted), x)


def _blocks(x: np.ndarray) -> np.ndarray:  # [64, 8, 8, 3]
    return x.reshape(4, 8, 16, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 8, 8, 3)


def test_each_transform_moves_or_changes_only_what_it_names() -> None:
    (x,) = _images(1)
    ciphers = {name: BlockCipher.from_key(KEY, 8, (4, 16), EncryptionOptions.parse(name)) for name in SINGLE}
    one = {name: cipher.encrypt(x) for name, cipher in ciphers.items()}
    # Block scrambling: the same blocks, elsewhere.
    assert sorted(b.tobytes() for b in _blocks(one["blocks"])) == sorted(b.tobytes() for b in _blocks(x))
    # Pixel shuffling: each block keeps its pixels (RGB triples), in another order, the same in every block.
    for enc, plain in zip(_blocks(one["pixels"]), _blocks(x), strict=True):
        assert sorted(map(bytes, enc.reshape(64, 3))) == sorted(map(bytes, plain.reshape(64, 3)))
    # Negative-positive: every value is v or 255 - v, about half of them flipped.
    flipped = one["negate"] != x
    assert np.all(one["negate"][flipped] == 255 - x[flipped]) and 0.3 < flipped.mean() < 0.7
    # Channel shuffling: a permutation of R, G, B.
    assert any(np.array_equal(one["channels"], x[..., list(p)]) for p in
               ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)))  # fmt: skip


@pytest.mark.parametrize("preset", VIT_PRESETS)
@pytest.mark.parametrize("transforms", ["all", *SINGLE])
def test_the_transformed_model_reads_encrypted_images_with_the_plain_models_logits(preset, transforms):
    torch.manual_seed(0)
    model = build_model(preset, b"\x07" * 32, 0.5).eval()
    with torch.no_grad():  # trained-looking weights: away from the init's near-uniform outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    options = EncryptionOptions.parse(transforms)
    cipher = BlockCipher.for_model(KEY, model, options)
    images = _images(4)
    plain = torch.stack([array_to_tensor(x) for x in images])
    encrypted = torch.stack([array_to_tensor(cipher.encrypt(x)) for x in images])
    targets = torch.randint(1, 30, (4, 9))
    transformed = encrypt_model(model, KEY, options)
    with torch.no_grad():
        want, got = model(plain, targets), transformed(encrypted, targets)
        blind = model(encrypted, targets)
    assert (got - want).abs().max().item() <= 1e-4
    assert (blind - want).abs().max().item() > 1e-2  # the original does not read encrypted images alike
    assert transformed.predict(encrypted, beam_width=1) == model.predict(plain, beam_width=1)


@pytest.mark.parametrize("preset", VIT_PRESETS)
@pytest.mark.parametrize("gamma", [0.5, None])
def test_an_aligned_model_trains_on_encrypted_images_as_the_plain_model_on_plain_ones(preset, gamma) -> None:
    """align_model changes no trained value (the packed state and its fingerprint stay), reads encrypted
    images with the plain model's logits, and an optimizer step on encrypted images moves the weights as
    the same step on plain images does: a federation on encrypted shards trains like one on plain shards."""
    from recognizer.train import train_step

    key = b"\x07" * 32
    torch.manual_seed(0)
    images = _images(4)
    targets = torch.randint(3, 30, (4, 7))
    plain_model, aligned = build_model(preset, key, gamma), build_model(preset, key, gamma)
    cipher = BlockCipher.for_model(KEY, aligned, EncryptionOptions())
    before = state.pack_model(aligned, key)
    align_model(aligned, cipher)
    if gamma is not None:  # hashed: only the index maps moved
        np.testing.assert_array_equal(state.pack_model(aligned, key), before)
    plain = torch.stack([array_to_tensor(x) for x in images])
    encrypted = torch.stack([array_to_tensor(cipher.encrypt(x)) for x in images])
    with torch.no_grad():
        want, got = plain_model.eval()(plain, targets), aligned.eval()(encrypted, targets)
    assert (got - want).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="aligned to an image key already"):
        align_model(aligned, cipher)
    with pytest.raises(ValueError, match="grid"):
        align_model(build_model(preset, key, gamma), BlockCipher.from_key(KEY, 8, (2, 2)))
    if gamma is None:  # unhashed: the weights themselves were permuted, so the steps are in other coordinates
        return
    for model, batch in ((plain_model, plain), (aligned, encrypted)):  # plain SGD: the step is the gradient
        model.train()
        train_step(model, batch, targets, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0)
    moved = state.pack_model(plain_model, key) - before
    assert np.abs(moved).max() > 1e-2
    stepped = state.pack_model(aligned, key) - before
    np.testing.assert_allclose(stepped, moved, atol=1e-5 * np.abs(moved).max())


def test_a_transformed_model_file_keeps_the_order_its_columns_are_read_in(tmp_path: Path) -> None:
    # vitstr-tiny-seq reads columns of tokens with a BiLSTM: its transformed model must put the tokens of
    # scrambled blocks back in place, and its file must say how.
    key = b"\x07" * 32
    torch.manual_seed(3)
    model = build_model("vitstr-tiny-seq", key, 0.5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    transformed = encrypt_model(model, KEY)
    order = token_order_of(transformed)
    assert order is not None and sorted(order) == list(range(64)) and token_order_of(model) is None
    fingerprint = state.fingerprint(build_model("vitstr-tiny-seq", key, None), key)
    save_model(tmp_path / "t.npz", transformed, key, "vitstr-tiny-seq", fingerprint, {"token_order": order})
    save_model(tmp_path / "lost.npz", transformed, key, "vitstr-tiny-seq", fingerprint)
    cipher = BlockCipher.for_model(KEY, model)
    images = torch.stack([array_to_tensor(cipher.encrypt(x)) for x in _images(3)])
    targets = torch.randint(1, 30, (3, 6))
    loaded, lost = load_model(tmp_path / "t.npz", key)[0], load_model(tmp_path / "lost.npz", key)[0]
    with torch.no_grad():
        want = transformed(images, targets)
        assert (loaded(images, targets) - want).abs().max().item() <= 1e-6
        assert (lost(images, targets) - want).abs().max().item() > 1e-2


def test_presets_without_a_patch_embedding_are_refused_by_name() -> None:
    model = build_model("fedocr-tiny", b"\x07" * 32, 0.5)
    with pytest.raises(ValueError, match="fedocr-tiny has no patch embedding"):
        encrypt_model(model, KEY)
    with pytest.raises(ValueError, match="fedocr-cpu has no patch embedding"):
        cipher_for_preset(KEY, "fedocr-cpu")


def _recognizer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recognizer.cli", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_encrypt_and_encrypt_model_commands_read_encrypted_data_as_the_plain_model_reads_plain(tmp_path):
    data, fed_key, image_key = tmp_path / "words", tmp_path / "model.key", tmp_path / "image.key"
    render_dataset(data, 12, seed=3, styles=["clean", "curved"], labels="words")
    generate_key(fed_key)
    generate_key(image_key)
    torch.manual_seed(1)
    model = build_model("vitstr-tiny", load_key(fed_key), 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fingerprint = state.fingerprint(build_model("vitstr-tiny", load_key(fed_key), 0.5), load_key(fed_key))
    save_model(tmp_path / "model.npz", model, load_key(fed_key), "vitstr-tiny", fingerprint)

    done = _recognizer("encrypt", "--data", str(data), "--out", str(tmp_path / "enc"), "--image-key",
                       str(image_key), "--progress", "none")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 12
    done = _recognizer("encrypt-model", "--model", str(tmp_path / "model.npz"), "--image-key", str(image_key),
                       "--out", str(tmp_path / "enc.npz"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    meta, _ = read_model_file(tmp_path / "enc.npz")
    assert meta["gamma"] is None and meta["transforms"] == "blocks,pixels,negate,channels"
    assert meta["image_key"] not in image_key.read_bytes().hex()  # a name of the key, not the key

    def scores(model_file: Path, lmdb: Path) -> dict:
        out = _recognizer("eval", "--model", str(model_file), "--key", str(fed_key), "--data", str(lmdb),
                          "--beam", "1", "--json", "--progress", "none")  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, encrypted = scores(tmp_path / "model.npz", data), scores(tmp_path / "enc.npz", tmp_path / "enc")
    assert abs(plain["loss"] - encrypted["loss"]) <= 1e-4 and plain["samples"] == encrypted["samples"] == 12
    assert plain["char_accuracy"] == encrypted["char_accuracy"]

    files = []
    for k, color in enumerate(("white", "yellow")):
        Image.new("RGB", (90, 30), color).save(tmp_path / f"{k}.png")
        files.append(str(tmp_path / f"{k}.png"))
    runs = (("model.npz", ()), ("enc.npz", ("--image-key", str(image_key))))
    read = [_recognizer("predict", "--model", str(tmp_path / m), "--key", str(fed_key), "--beam", "1", *extra,
                        *files) for m, extra in runs]  # fmt: skip
    assert all(r.returncode == 0 for r in read), [r.stderr for r in read]
    assert read[0].stdout == read[1].stdout
    refused = _recognizer("encrypt", "--data", str(data), "--out", str(tmp_path / "x"), "--image-key",
                          str(image_key), "--preset", "fedocr-tiny")  # fmt: skip
    assert refused.returncode != 0 and "fedocr-tiny has no patch embedding" in refused.stderr
