"""What each scale of the experiment runs: models, data sizes, rounds and the learning-rate plan."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedocr.recipe import DECAY_FACTORS
from recognizer.recipe import parse_gamma

# The six held-out test sets, one per style family (the analogues of the paper's benchmarks).
TEST_SETS: tuple[str, ...] = ("clean", "lowres", "blur", "perspective", "curved", "noisy")
MANNERS: tuple[str, ...] = ("single", "centralized", "federated")
PRETRAIN_STYLE = "clean"  # the style family of a scale's pretraining set (the paper: clean synthetic text)


@dataclass(frozen=True)
class ModelSpec:
    """One row of the paper's Table 1: a backbone family and a hashing ratio (None: not hashed)."""

    id: str
    label: str
    family: str  # "aster-fl" or "fedocr": the scale picks the preset of the family
    backbone: str
    gamma: str | None

    @property
    def gamma_value(self) -> float | None:
        """The hashing ratio as a number (None: not hashed)."""
        return None if self.gamma is None else parse_gamma(self.gamma)

    @property
    def slug(self) -> str:
        """The id as a file-name part ("fedocr-hash-1/2" -> "fedocr-hash-1_2")."""
        return self.id.replace("/", "_")


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("aster-fl", "ASTER-FL", "aster-fl", "ResNet", None),
    ModelSpec("fedocr-hash-1", "FedOCR-Hash_1", "fedocr", "ShuffleNetV2", "1"),
    ModelSpec("fedocr-hash-1/2", "FedOCR-Hash_1/2", "fedocr", "ShuffleNetV2", "1/2"),
    ModelSpec("fedocr-hash-1/4", "FedOCR-Hash_1/4", "fedocr", "ShuffleNetV2", "1/4"),
    ModelSpec("fedocr-hash-1/8", "FedOCR-Hash_1/8", "fedocr", "ShuffleNetV2", "1/8"),
)


@dataclass(frozen=True)
class Scale:
    """The size of one experiment: data, presets, rounds and how the machine is shared."""

    name: str
    presets: dict[str, str]  # family -> preset
    train_words: int  # split into `edges` IID shards
    test_words: int  # per test set
    rounds: int
    local_epochs: int
    batch_size: int
    decay_rounds: tuple[int, ...]  # 1-based rounds from which the lr is decayed
    cosine_from_round: int = 0  # 1-based round from which the lr falls along a cosine to 1% (0: off)
    # Pretraining (0: none): every manner of a model then starts from one model trained this many
    # epochs on this many PRETRAIN_STYLE words of other seeds, as the paper's models start pretrained.
    pretrain_words: int = 0
    pretrain_epochs: int = 0
    # Another scale whose federation key and pretrained models this one starts from ("": its own),
    # copied from that scale's work and results directories: a probe of that scale then fine-tunes
    # the very models it did. The data settings must be that scale's.
    pretrained_from: str = ""
    labels: str = "mixed"  # recognizer.synth.LABEL_KINDS
    optimizer: str = "adadelta"
    lr: float = 1.0
    edges: int = 5
    beam: int = 1  # beam width of the final evaluation (the paper's ASTER: 5)
    threads: int = 1  # torch threads per training process
    deadline_s: float = 3600.0  # a round's deadline at the aggregator
    seed: int = 20261122

    @property
    def epochs(self) -> int:
        """Passes over the data in every manner: rounds x local epochs."""
        return self.rounds * self.local_epochs

    @property
    def decay_factors(self) -> tuple[float, ...]:
        """The lr factor from each decay round on (relative to the initial lr)."""
        return DECAY_FACTORS[: len(self.decay_rounds)]

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        """0-based epochs of a centralized or single run from which the same decays apply."""
        return tuple((r - 1) * self.local_epochs for r in self.decay_rounds)

    @property
    def pretraining(self) -> dict | None:
        """What the models are pretrained on, as meta.json and the results record it (None: none)."""
        if not self.pretrain_words:
            return None
        return {"words": self.pretrain_words, "epochs": self.pretrain_epochs, "styles": PRETRAIN_STYLE}

    @property
    def cosine_from_epoch(self) -> int | None:
        """0-based epoch of a centralized or single run from which the same cosine applies (None: off)."""
        return (self.cosine_from_round - 1) * self.local_epochs if self.cosine_from_round else None


MINI_CPU = Scale(
    "mini-cpu", {"aster-fl": "aster-fl-tiny", "fedocr": "fedocr-cpu"},
    train_words=3_000, test_words=300, rounds=7, local_epochs=3, batch_size=16, decay_rounds=(),
    cosine_from_round=5, labels="digits", optimizer="adam", lr=2e-3, edges=3,
)  # fmt: skip
MINI_PRE = replace(
    MINI_CPU, name="mini-pre", rounds=4, cosine_from_round=3, pretrain_words=8_000, pretrain_epochs=3
)

SCALES: dict[str, Scale] = {
    # Checks the pipeline end to end in a few minutes (one test runs it): not a result.
    "smoke": Scale(
        "smoke", {"aster-fl": "aster-fl-tiny", "fedocr": "fedocr-tiny"},
        train_words=100, test_words=12, rounds=2, local_epochs=1, batch_size=10, decay_rounds=(2,),
        labels="digits", optimizer="adam", lr=2e-3, deadline_s=600.0, pretrain_words=40, pretrain_epochs=1,
        edges=2,
    ),
    # The first CPU run (docs/results/experiment-mini.md; 2 cores, 2 h 32 min): the CPU presets' recipe
    # (recognizer.recipe: Adam 2e-3, batch 16, no decay) on digit strings of every style, three
    # owners of 1,000 images each; each edge makes about 1,900 local steps, past the recipe's
    # take-off (benchmarks/learning.py). docs/results/experiment-mini-pre.md says why.
    "mini": Scale(
        "mini", {"aster-fl": "aster-fl-tiny", "fedocr": "fedocr-tiny"},
        train_words=3_000, test_words=300, rounds=10, local_epochs=3, batch_size=16, decay_rounds=(),
        labels="digits", optimizer="adam", lr=2e-3, edges=3,
    ),
    # `mini` again with a model that takes off sooner: fedocr-cpu (the default CPU preset, about 500
    # steps to take off on clean digits against fedocr-tiny's 1,250; results/learning-digits) and a
    # cosine over the last three rounds, so that the federated models (1,300 local steps per edge)
    # settle as the centralized ones do (docs/results/experiment-mini-cpu.md; 54 min on 2 cores).
    "mini-cpu": MINI_CPU,
    # The paper's protocol in miniature: models pretrained on clean digit strings (the paper's
    # synthetic pretraining), then fine-tuned on every style family in the three manners, so that
    # federated and centralized training start past the take-off, as in the paper
    # (docs/results/experiment-mini-pre.md; 41 min on 2 cores, pretraining included).
    "mini-pre": MINI_PRE,
    # `mini-pre` with twice the rounds (E_l = 3 still, as the paper): 8 rounds, a cosine over rounds
    # 5-8; the same data, key and pretrained models. Tests whether the FED - SUM gaps at 4 rounds
    # close once both manners train longer.
    "mini-pre-long": replace(
        MINI_PRE, name="mini-pre-long", rounds=8, cosine_from_round=5, pretrained_from="mini-pre"
    ),
    # `mini-pre` averaged after every local epoch instead of every third: 12 rounds x E_l = 1, the
    # same 12 epochs and cosine (epochs 7-12). A probe of where the FED - SUM gap comes from: only
    # federated runs are needed, single and centralized are `mini-pre`'s.
    "mini-pre-el1": replace(
        MINI_PRE, name="mini-pre-el1", rounds=12, local_epochs=1, cosine_from_round=7,
        pretrained_from="mini-pre",
    ),
    # `mini-pre` at batch 48: a centralized run then makes the sequential steps of one edge (750
    # in 12 epochs), each on as many images as the three edges' steps together. A probe of
    # whether the FED - SUM gap is the centralized run's three times as many steps. It starts from
    # mini-pre's models, pretrained at batch 16.
    "mini-pre-b48": replace(MINI_PRE, name="mini-pre-b48", batch_size=48, pretrained_from="mini-pre"),
    # The paper's settings: C=5, E_l=3, 44 rounds, decays at rounds 5 and 30, beam 5; an accelerator.
    "paper": Scale(
        "paper", {"aster-fl": "aster-fl", "fedocr": "fedocr"},
        train_words=500_000, test_words=2_000, rounds=44, local_epochs=3, batch_size=128,
        decay_rounds=(5, 30), beam=5, threads=4, deadline_s=6 * 3600.0,
    ),
}  # fmt: skip


def preset_of(scale: Scale, model: ModelSpec) -> str:
    """The preset a scale uses for a model's family."""
    return scale.presets[model.family]


def model_by_id(model_id: str) -> ModelSpec:
    """The model with this id. Raises ValueError listing the valid ids."""
    for m in MODELS:
        if m.id == model_id:
            return m
    raise ValueError(f"unknown model {model_id!r}; valid models: {', '.join(m.id for m in MODELS)}")
