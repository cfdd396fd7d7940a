"""Training-time augmentation: deterministic by seed, shape- and dtype-preserving, every family changes the
image, the data path and `recognizer train --recipe` wire it in, and it keeps a label readable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recognizer import cli
from recognizer.augment import FAMILIES, AugmentConfig, augment, gaussian_blur, gaussian_noise
from recognizer.dataset import WordDataset, array_to_tensor, collate, image_to_array, make_loader
from recognizer.recipe import GENERAL, NamedRecipe
from recognizer.synth import render_dataset
from recognizer.train import evaluate

ALL_OPS = [op for ops in FAMILIES.values() for op in ops]


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory):
    """32 rendered words (all styles) and the first 8 as uint8 arrays at the CPU presets' 32x100."""
    path = tmp_path_factory.mktemp("augment") / "words"
    render_dataset(path, 32, seed=5, labels="words")
    ds = WordDataset(path, (32, 100), keep_aspect=True)
    return path, [image_to_array(ds.reader.get(i)[0], (32, 100), True) for i in range(8)]


def test_the_same_seed_gives_the_same_images_and_another_seed_others(words) -> None:
    _, images = words
    config = AugmentConfig(ops=3, magnitude=0.8, prob=1.0)

    def run(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [augment(img, config, rng) for img in images]

    first, again, other = run(7), run(7), run(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("op", ALL_OPS, ids=[op.__name__ for op in ALL_OPS])
def test_every_op_keeps_shape_and_dtype_and_leaves_its_input_alone(op, words) -> None:
    _, images = words
    for level in (0.0, 0.5, 1.0):
        for img in images[:3]:
            before = img.copy()
            out = op(img, level, np.random.default_rng(1))
            assert out.shape == img.shape and out.dtype == np.uint8
            assert np.array_equal(img, before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_changes_every_image(family: str, words) -> None:
    _, images = words
    config = AugmentConfig(ops=1, magnitude=1.0, prob=1.0, families=(family,))
    rng = np.random.default_rng(3)
    changed = [np.abs(augment(img, config, rng).astype(int) - img).mean() for img in images]
    assert min(changed) > 1.0, f"{family}: mean absolute change per pixel {min(changed):.2f} on some image"


def test_config_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="unknown augmentation families"):
        AugmentConfig(families=("weather", "sepia"))
    with pytest.raises(ValueError, match="magnitude and prob"):
        AugmentConfig(magnitude=1.5)
    with pytest.raises(ValueError, match="ops must be within"):
        AugmentConfig(ops=5, families=("noise",))
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((32, 100), dtype=np.uint8), AugmentConfig(), np.random.default_rng(0))


def test_loader_augments_reproducibly_with_and_without_workers(words) -> None:
    path, _ = words
    config = AugmentConfig(ops=2, magnitude=0.6, prob=1.0)

    def first_batch(workers: int, augmented: AugmentConfig | None, seed: int = 0) -> torch.Tensor:
        loader = make_loader(path, 8, shuffle=True, workers=workers, seed=seed, input_hw=(32, 100),
                             keep_aspect=True, augment=augmented)
        return next(iter(loader))[0]

    plain = first_batch(0, None)
    in_process = first_batch(0, config)
    assert torch.equal(in_process, first_batch(0, config))
    assert not torch.equal(in_process, plain) and not torch.equal(in_process, first_batch(0, config, seed=1))
    assert in_process.dtype == torch.float32 and in_process.min() >= -1.0 and in_process.max() <= 1.0
    workers = first_batch(2, config)
    assert torch.equal(workers, first_batch(2, config))
    assert torch.equal(first_batch(2, None), plain)  # only the augmentation depends on the worker


def test_recipe_fills_only_the_train_options_not_given() -> None:
    parse = cli.build_parser().parse_args
    base = ["train", "--data", "d", "--out", "m.npz"]
    plain = parse(base)
    cli._apply_recipe(plain)
    assert (plain.augment, plain.epochs, plain.lr, plain.cosine_from) == ("none", 1, None, None)

    general = parse([*base, "--recipe", "general", "--epochs", "3", "--augment-magnitude", "0.3"])
    cli._apply_recipe(general)
    assert (general.epochs, general.augment_magnitude) == (3, 0.3)  # given: kept, even at the default
    filled = (general.augment, general.lr, general.cosine_from, general.preset, general.batch_size)
    assert filled == (GENERAL.augment, GENERAL.lr, GENERAL.cosine_from, GENERAL.preset, GENERAL.batch_size)
    assert filled == ("straug", 3e-3, 0, "fedocr-cpu-wide", 64)


def test_the_recipes_data_commands_are_synth_commands_of_its_label_kinds() -> None:
    parse = cli.build_parser().parse_args
    varied, long = parse(GENERAL.synth_argv("v")), parse(GENERAL.long_argv("l"))
    assert (varied.labels, varied.count, varied.styles) == ("general", GENERAL.synth_count, "varied")
    assert (long.labels, long.count, long.fonts, long.seed) == ("long", GENERAL.long_count, "train", 13)
    assert long.seed != varied.seed and GENERAL.long_count > 0
    assert NamedRecipe("plain").long_argv("l") == []  # a recipe without long words renders none


# The model that reads: the session's digit reader (conftest.py), trained until it reads MIN_CLEAN of
# held-out clean digit strings.
MIN_CLEAN = 0.7


@pytest.mark.timeout(900)
def test_augmented_images_stay_readable(digit_reader: dict) -> None:
    """The training setting (2 ops at magnitude 0.5, each with probability 0.5) keeps a label readable.

    The model saw only clean images of one style, so part of the loss is its lack of robustness, not
    an unreadable label: a quarter of the images stay untouched and most ops at half strength change
    pixels, not strokes. Measured here: 81.7% clean, 56.0% augmented (0.69x). Bound: augmented
    accuracy >= 0.6 x clean. A label-destroying control (a 4-pixel blur and heavy noise, which a
    person cannot read at 32 pixels high) must fall below the same bound, so it tells the two apart.
    """
    model, held_out = digit_reader["model"], digit_reader["held_out_path"]
    options = model.image_options

    def accuracy(config: AugmentConfig | None) -> float:
        loader = make_loader(held_out, 100, shuffle=False, seed=9, augment=config, **options)
        return evaluate(model, loader, beam_width=1).accuracy

    clean = accuracy(None)
    training = accuracy(AugmentConfig(ops=2, magnitude=0.5, prob=0.5))
    unreadable = _control_accuracy(model, held_out)
    assert clean >= MIN_CLEAN
    assert training >= 0.6 * clean, f"clean {clean:.3f}, augmented {training:.3f}"
    assert unreadable < 0.6 * clean, f"control {unreadable:.3f} against clean {clean:.3f}"


def _control_accuracy(model, held_out) -> float:
    """Accuracy on the held-out images blurred (radius 3.9) and noised (sigma 0.33): ops far past level 1."""
    ds = WordDataset(held_out, **model.image_options)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(len(ds)):
        image, label, _ = ds.reader.get(i)
        pixels = image_to_array(image, ds.input_hw, ds.keep_aspect)
        pixels = gaussian_noise(gaussian_blur(pixels, 4.0, rng), 3.0, rng)
        samples.append((array_to_tensor(pixels), ds.encode_target(label), label))
    batches = [collate(samples[i:i + 100]) for i in range(0, len(samples), 100)]
    return evaluate(model, batches, beam_width=1).accuracy
