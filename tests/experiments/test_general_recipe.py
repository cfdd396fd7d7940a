"""The general recipe's replicates: other render seeds, clear of the held-out sets', and seeded training."""

from __future__ import annotations

from benchmarks.generalization import SEED as HELD_OUT_SEED
from experiments.general_recipe import SEEDS, reseed
from recognizer.recipe import GENERAL


def test_a_replicate_moves_every_render_seed_and_seeds_training() -> None:
    synth = ["python", "-m", "recognizer.cli", *GENERAL.long_argv("out")]
    train = ["python", "-m", "recognizer.cli", "train", "--recipe", "general"]
    reseed(synth, 3)
    reseed(train, 3)
    assert synth[synth.index("--seed") + 1] == str(GENERAL.long_seed + 300)
    assert train[-2:] == ["--seed", "3"]
    highest = max(GENERAL.synth_seed, GENERAL.long_seed, 12) + 100 * (SEEDS - 1)
    assert highest < HELD_OUT_SEED  # no replicate renders a held-out set's words
