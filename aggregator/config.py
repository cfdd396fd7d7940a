"""The aggregator's configuration: one frozen dataclass, loaded from TOML and/or CLI flags."""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.fedavg import WEIGHTINGS
from aggregator.server_opt import DEFAULT_SERVER_LR, SERVER_OPTIMIZERS
from fedocr import encodings, secagg
from fedocr.recipe import DECAY_FACTORS, RECIPE
from fedocr.schedule import cosine_lr

# TOML section of every field; the key inside the section is the field name.
SECTIONS: dict[str, tuple[str, ...]] = {
    "server": ("listen", "state_dir", "max_workers", "log_level"),
    "tls": ("cert", "key", "ca"),
    "rounds": ("total_rounds", "quorum", "min_edges", "deadline_s", "weighting"),
    "plan": (
        "local_epochs",
        "learning_rate",
        "lr_decay_rounds",
        "lr_decay_factors",
        "lr_cosine_from_round",
        "batch_size",
        "optimizer",
        "encoding",
        "error_feedback",
        "proximal_mu",
        "warmup_rounds",
        "warmup_words",
        "warmup_styles",
        "warmup_labels",
        "warmup_seed",
        "warmup_rehearsal",
    ),
    "transfer": (
        "download_encoding",
        "accept_encodings",
        "zstd_level",
        "max_chunk_bytes",
        "chunk_elements",
        "max_concurrent_uploads",
        "upload_wait_s",
        "join_wait_max_s",
        "stream_window_bytes",
        "log_uploads_from_bytes",
    ),
    "aggregation": ("server_optimizer", "server_lr", "server_beta1", "server_beta2", "server_tau"),
    "secure_aggregation": (
        "enabled",
        "threshold",
        "neighbours",
        "clip",
        "frac_bits",
        "max_weight_sum",
        "phase_s",
        "code_bits",
        "sample_cap",
        "code_range",
        "hide_weights",
    ),
    # A leaf aggregator: its root's address and the leaf's own certificate (role leaf) toward it.
    "tier": ("root", "cert", "key"),
}
# TOML keys whose field has another name: [secure_aggregation] keys carry the "secagg_" prefix.
RENAMED: dict[tuple[str, str], str] = {
    ("secure_aggregation", "enabled"): "secure_aggregation",
    **{("secure_aggregation", k): "secagg_" + k for k in SECTIONS["secure_aggregation"][1:]},
    ("tier", "cert"): "root_cert",
    ("tier", "key"): "root_key",
}


# A chunk's payload must fit one gRPC message (the server allows 4 MiB) with room for framing.
MAX_MESSAGE_PAYLOAD = 3 << 20


class ConfigError(ValueError):
    """The configuration is inconsistent or names an unknown key."""


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything `aggregator serve` needs; see deploy/aggregator.toml for a commented sample."""

    listen: str = "127.0.0.1:50051"
    state_dir: Path = Path("runs/aggregator/state")
    max_workers: int = 64  # uploads, downloads and unary RPCs; long-polls are coroutines and hold none
    log_level: str = "INFO"
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    total_rounds: int = 40
    quorum: int = 2  # a round closes as soon as this many edges uploaded
    min_edges: int = 1  # at the deadline, enough to aggregate; below it the round fails (see round_min_edges)
    deadline_s: float = 600.0
    weighting: str = "samples"  # "samples" (FedAvg) or "uniform" (the paper's Algorithm 2)
    local_epochs: int = RECIPE.epochs
    # The edges' default recipe (fedocr.recipe); the paper's is Adadelta at lr 1.0, x0.1 from round 5
    # and x0.01 from round 30, batch 64 (deploy/aggregator.toml shows it).
    learning_rate: float = RECIPE.lr
    # 1-based round numbers from which lr is multiplied by the matching factor (paper: 5 and 30).
    lr_decay_rounds: tuple[int, ...] = RECIPE.decay_at
    lr_decay_factors: tuple[float, ...] = DECAY_FACTORS[: len(RECIPE.decay_at)]
    # 1-based round from which the lr follows a cosine down to 1% at the end of the last round
    # (fedocr.schedule.cosine_lr; 0 = off): hold it through the take-off, then settle.
    lr_cosine_from_round: int = 0
    batch_size: int = RECIPE.batch_size
    # The edges' local optimizer ("" leaves it to each edge's --optimizer flag).
    optimizer: str = RECIPE.optimizer
    # How edges encode their uploads (fedocr.encodings: float32, float16, int8, int4, int3, int2), and whether
    # they carry each round's quantization error into the next upload (error feedback).
    encoding: str = "float32"
    error_feedback: bool = True
    # FedProx (Li et al. 2020): edges add mu/2 ||w - w_round||^2 to their loss; 0 = off.
    proximal_mu: float = 0.0
    # Warm-up (the paper's synthetic pre-training, on the edges): in the first warmup_rounds rounds
    # each edge renders warmup_words words itself (these styles and label kind, from warmup_seed and
    # its identity) and trains on them; from the next round on, on its own shard.
    warmup_rounds: int = 0
    warmup_words: int = 2000
    warmup_styles: str = "varied"
    warmup_labels: str = "words"
    warmup_seed: int = 0
    # After the warm-up rounds each local epoch also goes over warmup_rehearsal x (the shard's size)
    # of the edge's warm-up words, drawn anew each round (0 = off: the shard alone).
    warmup_rehearsal: float = 0.0
    accept_encodings: tuple[str, ...] = tuple(encodings.NAMES)  # uploads in others are refused
    # How edges download the state (aggregator/visible.py): float32 sends the global state itself; a
    # lossy encoding sends each round's change of the state edges see, with error feedback here.
    download_encoding: str = "float32"
    zstd_level: int = 3
    max_chunk_bytes: int = 2 << 20  # decoded bytes per upload chunk (fedocr.tensors.MAX_CHUNK_RAW_BYTES)
    # float32 values per downloaded chunk (256 KiB): gRPC keeps, per connection, buffers about the
    # size of the largest message it carried (measured ~0.8 MiB/connection at 1 MiB chunks, ~0.35
    # at 256 KiB), so small chunks keep memory flat with hundreds of edges.
    chunk_elements: int = 1 << 16
    max_concurrent_uploads: int = 2  # each staged upload holds one model copy in memory
    # Plain uploads are written to the upload log (aggregator/spool.py) when the round's float64 sum
    # is at least this large; a smaller sum is rewritten with each durable write, which costs less.
    log_uploads_from_bytes: int = 4 << 20
    upload_wait_s: float = 60.0  # an upload beyond the bound waits this long, then RESOURCE_EXHAUSTED
    join_wait_max_s: float = 30.0  # cap on a Join long-poll
    # Fixed HTTP/2 stream window: bounds what a waiting upload holds in the transport (0 = BDP).
    stream_window_bytes: int = 1 << 20
    # How the round's mean increment moves the global state (aggregator/server_opt.py): fedavg adds it
    # as it is (exact); fedavgm, fedadam and fedyogi are the server optimizers of Reddi et al. 2021.
    server_optimizer: str = "fedavg"
    server_lr: float = 0.0  # 0: the optimizer's default (1 for fedavg and fedavgm, 0.01 for fedadam/fedyogi)
    server_beta1: float = 0.9  # momentum (fedavgm: m = beta1 m + mean)
    server_beta2: float = 0.99  # second-moment decay (fedadam, fedyogi)
    server_tau: float = 1e-3  # adaptivity: the floor under sqrt(v) (fedadam, fedyogi)
    # Secure aggregation (docs/aggregator.md): the server learns only the round's sum.
    secure_aggregation: bool = False
    secagg_threshold: int = 0  # shares that rebuild a secret; 0 = a majority of its holders
    secagg_neighbours: int = 0  # k of the SecAgg+ graph; 0 = secagg.neighbour_count(roster size)
    secagg_clip: float = 8.0  # increments are clipped to [-clip, clip] (BN running stats included)
    secagg_frac_bits: int = 0  # fixed-point fraction bits; 0 = the most max_weight_sum allows
    # The largest weight sum of a round (200 edges x 10,000 samples): sums below it cannot wrap.
    secagg_max_weight_sum: float = 2_000_000.0
    secagg_phase_s: float = 60.0  # each phase after the roster is fixed ends by this many seconds
    # Compressed masked uploads: the parameters as b-bit codes (2..8) masked modulo 2^8, 2^16 or
    # 2^32, whichever is the narrowest the roster allows; 0 = 32-bit fixed point for every value.
    secagg_code_bits: int = 0
    # With code_bits and weighting by samples: an edge weighs min(samples, cap) / cap in its codes, cap
    # being this in a federation's first round and then the previous round's largest sample count.
    secagg_sample_cap: float = 10_000.0
    # The codes' range in a federation's first round; later rounds take it from the previous global
    # increment (secagg.next_code_range). Values beyond it are clipped, and error feedback keeps them.
    secagg_code_range: float = 0.1
    # Edges send their weights masked, as the upload's last values: the server learns only their sum.
    secagg_hide_weights: bool = False
    # A leaf aggregator (docs/aggregator.md, "Two tiers"): host:port of the root it forwards each
    # round's sum to, and the leaf's client certificate and key there (role leaf; CA: ``ca``).
    # Its rounds and plans are the root's; quorum, min_edges and deadline_s stay its own.
    root: str = ""
    root_cert: Path | None = None
    root_key: Path | None = None

    def __post_init__(self) -> None:
        """Validate cross-field constraints."""
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        unknown = [e for e in (*self.accept_encodings, self.encoding) if e not in encodings.NAMES]
        if unknown:
            raise ConfigError(f"unknown encoding {unknown[0]!r}; choose from {', '.join(encodings.NAMES)}")
        if self.warmup_rounds and not (0 <= self.warmup_rounds <= self.total_rounds and self.warmup_words >= 1
                                       and self.warmup_styles and self.warmup_labels):
            raise ConfigError("warmup_rounds must be within 0..total_rounds, with warmup_words >= 1 and "
                              "warmup_styles and warmup_labels named")
        if not 0 <= self.warmup_rehearsal < math.inf or (self.warmup_rehearsal and not self.warmup_rounds):
            raise ConfigError(f"warmup_rehearsal must be a finite number >= 0, and needs warmup_rounds, got "
                              f"{self.warmup_rehearsal} with {self.warmup_rounds} warm-up rounds")
        if not 0 <= self.proximal_mu < math.inf:
            raise ConfigError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            names = ", ".join(SERVER_OPTIMIZERS)
            raise ConfigError(f"unknown server_optimizer {self.server_optimizer!r}; choose from {names}")
        if not (0 <= self.server_lr < math.inf and 0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1
                and 0 < self.server_tau < math.inf):
            raise ConfigError("server_lr must be >= 0, server_beta1 and server_beta2 within [0, 1), "
                              "server_tau > 0")
        if self.download_encoding not in encodings.NAMES:
            names = ", ".join(encodings.NAMES)
            raise ConfigError(f"unknown download_encoding {self.download_encoding!r}; choose from {names}")
        if self.encoding not in self.accept_encodings:
            raise ConfigError(
                f"the plan's encoding {self.encoding!r} is not in accept_encodings "
                f"{list(self.accept_encodings)}"
            )
        if self.optimizer and not self.optimizer.isidentifier():
            raise ConfigError(f"optimizer must be a name such as 'adam' (or empty), got {self.optimizer!r}")
        if self.quorum < 1 or self.min_edges < 1 or self.min_edges > self.quorum:
            raise ConfigError(f"need 1 <= min_edges ({self.min_edges}) <= quorum ({self.quorum})")
        if self.total_rounds < 1:
            raise ConfigError("total_rounds must be >= 1")
        if len(self.lr_decay_rounds) != len(self.lr_decay_factors):
            raise ConfigError("lr_decay_rounds and lr_decay_factors must have the same length")
        if not 0 <= self.lr_cosine_from_round <= self.total_rounds:
            raise ConfigError(
                f"lr_cosine_from_round must be within 0..total_rounds ({self.total_rounds}), "
                f"got {self.lr_cosine_from_round}"
            )
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError("zstd_level must be within 1..22")
        if not 4096 <= self.max_chunk_bytes <= MAX_MESSAGE_PAYLOAD:
            raise ConfigError(
                f"max_chunk_bytes must be within 4096..{MAX_MESSAGE_PAYLOAD} (gRPC message limit)"
            )
        if not 1 <= self.chunk_elements <= MAX_MESSAGE_PAYLOAD // 4:
            raise ConfigError(f"chunk_elements must be within 1..{MAX_MESSAGE_PAYLOAD // 4}")
        if self.max_concurrent_uploads < 1 or self.deadline_s <= 0:
            raise ConfigError("max_concurrent_uploads must be >= 1 and deadline_s > 0")
        if self.log_uploads_from_bytes < 0:
            raise ConfigError(f"log_uploads_from_bytes must be >= 0, got {self.log_uploads_from_bytes}")
        if self.max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {self.max_workers}")
        for name in ("deadline_s", "upload_wait_s", "join_wait_max_s", "learning_rate"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not all(math.isfinite(x) for x in self.lr_decay_factors):
            raise ConfigError(f"lr_decay_factors must be finite, got {self.lr_decay_factors}")
        if not isinstance(logging.getLevelNamesMapping().get(str(self.log_level).upper()), int):
            raise ConfigError(f"log_level {self.log_level!r} is not a level (DEBUG, INFO, WARNING ...)")
        self._check_secure_aggregation()
        self._check_leaf()

    def _check_leaf(self) -> None:
        """A leaf needs its certificate toward the root, and forwards its sum as it is."""
        if not self.root:
            return
        if not (self.root_cert and self.root_key):
            raise ConfigError("a leaf (root set) needs its leaf certificate and key: [tier] cert and key")
        if self.server_optimizer != "fedavg" or self.download_encoding != "float32":
            raise ConfigError(
                "a leaf aggregator forwards its sum as it is: server_optimizer fedavg and "
                "download_encoding float32 (the root applies its own optimizer and encodings)"
            )

    def _check_secure_aggregation(self) -> None:
        """Validate the [secure_aggregation] table (checked even when it is off, so typos surface)."""
        if self.secagg_threshold < 0 or self.secagg_threshold == 1:
            raise ConfigError(
                f"secure_aggregation.threshold must be 0 (a majority of holders) or at least 2, "
                f"got {self.secagg_threshold}"
            )
        if self.secure_aggregation and self.quorum < secagg.MIN_SURVIVORS:
            raise ConfigError(
                f"secure rounds need a quorum of at least {secagg.MIN_SURVIVORS}, got {self.quorum}: with "
                "two uploads each edge would learn the other's update from the published model"
            )
        if self.secure_aggregation and self.secagg_threshold > self.round_min_edges:
            raise ConfigError(
                f"secure_aggregation.threshold {self.secagg_threshold} exceeds min_edges "
                f"{self.round_min_edges}: a round of min_edges edges could never rebuild a secret"
            )
        k = self.secagg_neighbours
        if k < 0 or k % 2 or (k and self.secagg_threshold > k + 1):
            raise ConfigError(
                f"secure_aggregation.neighbours must be 0 (automatic) or even and at least 2, and hold at "
                f"least threshold - 1 ({max(self.secagg_threshold - 1, 0)}) edges; got {k}"
            )
        if not 0 < self.secagg_clip < math.inf:
            raise ConfigError(f"secure_aggregation.clip must be positive and finite, got {self.secagg_clip}")
        if not 1 <= self.secagg_max_weight_sum < 2**31:
            raise ConfigError(
                f"secure_aggregation.max_weight_sum must be within 1..2**31, got {self.secagg_max_weight_sum}"
            )
        if not 0 <= self.secagg_frac_bits <= 30:
            raise ConfigError(
                f"secure_aggregation.frac_bits must be within 0..30, got {self.secagg_frac_bits}"
            )
        if self.secagg_code_bits and self.secagg_code_bits not in secagg.CODE_BITS:
            raise ConfigError(
                f"secure_aggregation.code_bits must be 0 (32-bit fixed point) or within "
                f"{secagg.CODE_BITS.start}..{secagg.CODE_BITS.stop - 1}, got {self.secagg_code_bits}"
            )
        if not 1 <= self.secagg_sample_cap < math.inf:
            raise ConfigError(
                f"secure_aggregation.sample_cap must be at least 1, got {self.secagg_sample_cap}"
            )
        if not 0 < self.secagg_code_range <= self.secagg_clip:
            raise ConfigError(
                f"secure_aggregation.code_range must be positive and at most the clip {self.secagg_clip}, "
                f"got {self.secagg_code_range}"
            )
        if self.secure_aggregation and not 0 < self.secagg_phase_s < math.inf:
            raise ConfigError(f"secure_aggregation.phase_s must be positive, got {self.secagg_phase_s}")
        try:
            secagg.check_headroom(self.secagg_weight_limit, self.secagg_clip, self.secagg_bits)
        except secagg.SecAggError as exc:
            raise ConfigError(f"secure_aggregation: {exc}") from None

    def warmup_for(self, round_index: int) -> tuple[int, str, str, int, float]:
        """The warm-up words of a 0-based round index and their rehearsal share: (words, styles,
        labels, seed, 0) in a warm-up round, (..., warmup_rehearsal) after it if that is on, or none."""
        spec = self.warmup_words, self.warmup_styles, self.warmup_labels, self.warmup_seed
        if round_index < self.warmup_rounds:
            return *spec, 0.0
        if self.warmup_rehearsal:  # validated: only with warm-up rounds
            return *spec, self.warmup_rehearsal
        return 0, "", "", 0, 0.0

    @property
    def server_step_lr(self) -> float:
        """The server optimizer's lr: as set, or its default."""
        return self.server_lr or DEFAULT_SERVER_LR[self.server_optimizer]

    @property
    def round_min_edges(self) -> int:
        """The uploads a round needs at its deadline: min_edges, and for secure rounds at least
        secagg.MIN_SURVIVORS (3), which min_edges can raise but not lower."""
        if self.secure_aggregation:
            return max(self.min_edges, secagg.MIN_SURVIVORS)
        return self.min_edges

    @property
    def secagg_weight_limit(self) -> float:
        """The most a secure round's weights may sum to: max_weight_sum, and with uniform weighting
        (weight 1 an upload) also the quorum, as a round takes no more edges than it waits for."""
        if self.weighting == "uniform":
            return float(min(self.secagg_max_weight_sum, self.quorum))
        return float(self.secagg_max_weight_sum)

    @property
    def secagg_bits(self) -> int:
        """The fixed-point fraction bits: as set, or the most that the weight limit and clip allow
        (secagg.most_frac_bits; uniform weighting leaves far more than weighting by samples)."""
        if self.secagg_frac_bits:
            return self.secagg_frac_bits
        return secagg.most_frac_bits(self.secagg_weight_limit, self.secagg_clip)

    def learning_rate_for(self, round_index: int) -> float:
        """The lr of a 0-based round index: base lr times the factor of the last decay reached, then
        the cosine from lr_cosine_from_round, taken at the middle of the round."""
        lr = self.learning_rate
        for start, factor in zip(self.lr_decay_rounds, self.lr_decay_factors, strict=True):
            if round_index + 1 >= start:
                lr = self.learning_rate * factor
        if self.lr_cosine_from_round:
            lr = cosine_lr(round_index + 0.5, lr, self.lr_cosine_from_round - 1, self.total_rounds)
        return lr

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> AggregatorConfig:
        """Read a TOML file (if any) then apply non-None overrides (CLI flags)."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as fh:
                try:
                    doc = tomllib.load(fh)
                except tomllib.TOMLDecodeError as exc:
                    raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
            for section, table in doc.items():
                if section not in SECTIONS or not isinstance(table, dict):
                    raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
                for key, value in table.items():
                    if key not in SECTIONS[section]:
                        raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
                    values[RENAMED.get((section, key), key)] = value
            values = _coerce(values, f"{path}: ")
            base = Path(path).resolve().parent
            for key in ("state_dir", "cert", "key", "ca", "root_cert", "root_key"):  # relative to the file
                if key in values:
                    values[key] = base / values[key]
        values.update(_coerce({k: v for k, v in overrides.items() if v is not None}))
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def _coerce(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check TOML/CLI values against the fields' types; ConfigError names the setting (and `where`)."""
    out: dict[str, Any] = {}
    types = {f.name: str(f.type) for f in dataclasses.fields(AggregatorConfig)}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{where}unknown setting {key!r}")
        kind = types[key]
        try:
            out[key] = _convert(kind, value)
        except TypeError:
            expected = next(text for prefix, text in _EXPECTED if kind.startswith(prefix))
            raise ConfigError(f"{where}{key} = {value!r} is not {expected}") from None
    return out


_EXPECTED = (
    ("Path", "a path (string)"),
    ("tuple[int", "a list of integers"),
    ("tuple[float", "a list of numbers"),
    ("tuple[str", "a list of strings"),
    ("bool", "true or false"),
    ("int", "an integer"),
    ("float", "a number"),
    ("str", "a string"),
)


def _convert(kind: str, value: Any) -> Any:
    """One value as field type `kind` ("int", "float", "str", "Path | None", "tuple[int, ...]" ...)."""
    if "Path" in kind:
        if not isinstance(value, str | Path):
            raise TypeError(kind)
        return Path(value)
    if kind.startswith("tuple["):
        if not isinstance(value, list | tuple):
            raise TypeError(kind)
        item = kind[len("tuple[") :].split(",")[0]
        return tuple(_convert(item, v) for v in value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(kind)
        return value
    if kind == "str" and not isinstance(value, str):
        raise TypeError(kind)
    if kind in ("int", "float"):  # a bool is an int to Python, never to an operator
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else int | float):
            raise TypeError(kind)
        return int(value) if kind == "int" else float(value)
    return value


def field_names() -> list[str]:
    """All setting names, for the CLI."""
    return [f.name for f in dataclasses.fields(AggregatorConfig)]


__all__ = ["AggregatorConfig", "ConfigError", "SECTIONS", "field_names"]
