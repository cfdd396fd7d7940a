"""The recognizer (ASTER-FL and FedOCR-Hash): its config, presets, construction and size report."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recognizer import hashing
from recognizer.blocks import PolarityNorm, ResNetEncoder, SequenceEncoder, ShuffleNetEncoder
from recognizer.charset import DEFAULT_ALPHABET, MAX_SEQ_LEN, PAD, Alphabet, get_alphabet
from recognizer.decoder import AttentionDecoder, sequence_loss
from recognizer.keys import derive_seed
from recognizer.state import state_lengths
from recognizer.tps import Rectifier
from recognizer.vit import ViTEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one recognizer; every preset is the same network at a different width."""

    name: str
    encoder: Literal["resnet", "shufflenet", "vit"]
    # resnet: stem + 5 stages; shufflenet: stem + 3 stages + final 1x1 conv (see blocks.py); vit:
    # unused (the vit_* fields below; recognizer/vit.py).
    encoder_widths: tuple[int, ...]
    encoder_depths: tuple[int, ...]
    lstm_hidden: int = 256  # per direction; the decoder reads 2x this
    lstm_layers: int = 2
    lstm_skip: bool = False  # a linear skip around the BiLSTM (see blocks.SequenceEncoder)
    dec_hidden: int = 512
    dec_attention: int = 512
    dec_embedding: int = 512
    dec_location: int = 0  # width of the location-aware attention filters (0: ASTER's content-only)
    ctc_weight: float = 0.0  # > 0: an auxiliary CTC head on the BiLSTM, its loss weighted so in training
    input_hw: tuple[int, int] = (64, 256)
    keep_aspect: bool = False  # read images at input_hw's height, aspect kept, padded (dataset.py)
    polarity_norm: bool = False  # grey, standardized, text bright on dark (blocks.PolarityNorm)
    tps: bool = True
    tps_points: int = 20
    tps_input_hw: tuple[int, int] = (32, 64)  # the localization net sees a downsampled copy
    tps_output_hw: tuple[int, int] = (32, 100)  # the encoder's input; 100 wide gives a 25-step sequence
    tps_margins: tuple[float, float] = (0.05, 0.05)
    stn_widths: tuple[int, ...] = (32, 64, 128, 256, 256, 256)
    stn_fc: int = 512
    alphabet: str = DEFAULT_ALPHABET  # recognizer.charset.ALPHABETS; part of the fingerprint
    # The vit encoder: P x P blocks of the tps_output_hw image as tokens, their width, blocks, heads.
    vit_patch: int = 8
    vit_dim: int = 96
    vit_depth: int = 4
    vit_heads: int = 3
    # vit: average each column of blocks and read the columns with the BiLSTM, the CTC head and the
    # location-aware decoder of the CPU presets (False: the decoder reads the tokens, content-only).
    vit_columns: bool = False


_RESNET45 = (3, 4, 6, 6, 3)
_SHUFFLE = (4, 8, 4)
# The CPU presets' recipe (benchmarks/learning.py measures each choice): no TPS rectifier (one
# learning from scratch holds the recognizer on its initial plateau), images read at the encoder's
# 32x100 directly with their aspect ratio kept and normalized to grey text bright on dark,
# location-aware attention, and an auxiliary CTC loss whose gradient reaches the CNN through a
# linear skip around the BiLSTM (without the skip, the fresh BiLSTM holds it back as well).
_CPU = {"tps": False, "input_hw": (32, 100), "keep_aspect": True, "polarity_norm": True,
        "dec_location": 7, "lstm_skip": True, "ctc_weight": 0.5}
# The small sequence model, decoder and (unused without tps) rectifier of the tiny CPU presets.
_TINY = {"lstm_hidden": 64, "lstm_layers": 2, "dec_hidden": 96, "dec_attention": 96, "dec_embedding": 32,
         "stn_widths": (8, 16, 32, 32, 32, 32), "stn_fc": 64, **_CPU}

PRESETS: dict[str, ModelConfig] = {
    # aster.pytorch as the FedOCR paper's baseline: 20.99 M parameters in Table 1.
    "aster-fl": ModelConfig("aster-fl", "resnet", (32, 32, 64, 128, 256, 512), _RESNET45),
    # ShuffleNetV2 2.0x stages with a 1024-wide final conv: the width that lands on Table 1's 13.34 M
    # (the 2048 of ImageNet ShuffleNetV2 2.0x would give 16.5 M through a wider first LSTM layer).
    "fedocr": ModelConfig("fedocr", "shufflenet", (24, 244, 488, 976, 1024), _SHUFFLE),
    "aster-fl-small": ModelConfig(
        "aster-fl-small", "resnet", (16, 16, 32, 64, 96, 128), _RESNET45,
        lstm_hidden=96, dec_hidden=128, dec_attention=128, dec_embedding=64,
        stn_widths=(16, 32, 64, 64, 64, 64), stn_fc=128, **_CPU,
    ),
    "fedocr-small": ModelConfig(
        "fedocr-small", "shufflenet", (24, 116, 232, 464, 256), _SHUFFLE,
        lstm_hidden=128, dec_hidden=192, dec_attention=192, dec_embedding=128,
        stn_widths=(16, 32, 64, 64, 64, 64), stn_fc=128, **_CPU,
    ),
    # Half the widths of aster-fl and fedocr everywhere (ShuffleNetV2 1.0x stages): the CPU
    # experiments (experiments/scales.py).
    "aster-fl-half-norect": ModelConfig(
        "aster-fl-half-norect", "resnet", (16, 16, 32, 64, 128, 256), _RESNET45,
        lstm_hidden=128, dec_hidden=256, dec_attention=256, dec_embedding=256, **_CPU,
    ),
    "fedocr-half-norect": ModelConfig(
        "fedocr-half-norect", "shufflenet", (24, 116, 232, 464, 512), _SHUFFLE,
        lstm_hidden=128, dec_hidden=256, dec_attention=256, dec_embedding=256, **_CPU,
    ),
    # ASTER-FL's ResNet at fedocr-tiny's widths, one or two residual blocks per stage: the `mini`
    # experiment's ASTER-FL (experiments/scales.py), 0.2 CPU-s per batch of 16 on one thread.
    "aster-fl-tiny": ModelConfig(
        "aster-fl-tiny", "resnet", (16, 16, 32, 64, 128, 128), (1, 2, 2, 2, 1), **_TINY),
    # The smallest: learns to read digit strings in minutes on one core (demo, tests, `mini`).
    "fedocr-tiny": ModelConfig(
        "fedocr-tiny", "shufflenet", (16, 32, 64, 128, 128), _SHUFFLE, **_TINY),
    # The default CPU preset: fedocr-tiny with ShuffleNetV2 stages three times as wide (96/192/384,
    # about 0.75x ImageNet's 1.0x). Its encoder costs 22 M multiply-adds per 32x100 image against
    # fedocr-tiny's 3.2 M, and it leaves the plateau on dictionary words after about 1,000 steps
    # instead of 2,500 (benchmarks/learning.py: rows default and narrow-stages).
    "fedocr-cpu": ModelConfig(
        "fedocr-cpu", "shufflenet", (24, 96, 192, 384, 128), _SHUFFLE, **_TINY),
    # fedocr-cpu reading 32x160 images: 40 columns, so words of up to 25 letters keep a column each
    # (the CTC head needs one per letter) and long words are squeezed less. The same weights as
    # fedocr-cpu (a model of one starts the other); the general recipe's preset.
    "fedocr-cpu-wide": ModelConfig(
        "fedocr-cpu-wide", "shufflenet", (24, 96, 192, 384, 128), _SHUFFLE,
        **{**_TINY, "input_hw": (32, 160), "tps_output_hw": (32, 160)}),
    # A transformer recognizer (after ViTSTR): 8x8 blocks of a 32x128 image as 64 tokens of width 96,
    # four pre-norm blocks of 3 heads, and the attention decoder of the tiny presets reading the tokens
    # with content-only attention (no BiLSTM, no CTC head, no location filters, no polarity norm), so
    # that image encryption with a key maps to a transformation of its weights (recognizer/image_crypt.py).
    "vitstr-tiny": ModelConfig(
        "vitstr-tiny", "vit", (), (),
        **{**_TINY, "input_hw": (32, 128), "tps_output_hw": (32, 128), "polarity_norm": False,
           "dec_location": 0, "lstm_skip": False, "ctc_weight": 0.0}),
    # vitstr-tiny's encoder with the CPU presets' head: each column of blocks averaged (16 columns),
    # the BiLSTM with its skip, the auxiliary CTC loss and location-aware attention. A model transformed
    # for scrambled blocks reads its tokens back in the plain order first, so it stays exact.
    "vitstr-tiny-seq": ModelConfig(
        "vitstr-tiny-seq", "vit", (), (),
        **{**_TINY, "input_hw": (32, 128), "tps_output_hw": (32, 128), "polarity_norm": False,
           "vit_columns": True}),
}  # fmt: skip


class Recognizer(nn.Module):
    """TPS rectifier, CNN encoder, BiLSTM and attentional decoder (ASTER, Shi et al. 2018)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gamma: float | None = None  # set by build_model once hashed
        self.alphabet: Alphabet = get_alphabet(config.alphabet)
        c = config
        self.input_norm = PolarityNorm() if c.polarity_norm else None
        self.rectifier = (
            Rectifier(c.tps_input_hw, c.tps_output_hw, c.tps_points, c.tps_margins, c.stn_widths, c.stn_fc)
            if c.tps
            else None
        )
        self.sequence: SequenceEncoder | None = None
        if c.encoder == "vit":
            if c.polarity_norm or c.tps or (not c.vit_columns and (c.ctc_weight or c.dec_location)):
                raise ValueError(f"{c.name}: a vit encoder takes no polarity norm or rectifier (they read "
                                 "the whole image); reading tokens, no CTC head or location filter")
            self.encoder: ResNetEncoder | ShuffleNetEncoder | ViTEncoder = ViTEncoder(
                c.tps_output_hw, c.vit_patch, c.vit_dim, c.vit_depth, c.vit_heads
            )
            features = self.encoder.out_channels
            if c.vit_columns:
                self.sequence = SequenceEncoder(features, c.lstm_hidden, c.lstm_layers, c.lstm_skip)
                features = self.sequence.out_channels
        else:
            if c.encoder == "resnet":
                self.encoder = ResNetEncoder(c.encoder_widths, c.encoder_depths)
            elif c.encoder == "shufflenet":
                self.encoder = ShuffleNetEncoder(c.encoder_widths, c.encoder_depths)
            else:
                raise ValueError(f"unknown encoder kind {c.encoder!r}: resnet, shufflenet or vit")
            channels = self.encoder.out_channels
            self.sequence = SequenceEncoder(channels, c.lstm_hidden, c.lstm_layers, c.lstm_skip)
            features = self.sequence.out_channels
        classes = self.alphabet.num_classes
        self.decoder = AttentionDecoder(
            features, c.dec_hidden, c.dec_attention, c.dec_embedding, classes, c.dec_location
        )
        # The auxiliary CTC head reads the BiLSTM's sequence; PAD, never a target, is its blank.
        self.ctc_head: nn.Linear | None = None
        if c.ctc_weight:
            self.ctc_head = nn.Linear(features, self.alphabet.num_classes)
        self.rectify = True  # False bypasses the rectifier (training may switch it on later)

    def reset_parameters(self) -> None:
        """The initialization of aster.pytorch, drawn from the global torch generator."""
        if self.rectifier is not None:
            self.rectifier.localization.reset_parameters()
        self.encoder.reset_parameters()
        if self.sequence is not None:
            self.sequence.rnn.reset_parameters()
            if self.sequence.skip is not None:
                self.sequence.skip.reset_parameters()
        self.decoder.reset_parameters()
        if self.ctc_head is not None:
            self.ctc_head.reset_parameters()

    @contextlib.contextmanager
    def _weights_cached(self) -> Iterator[None]:
        """Build each hashed weight once per forward (the decoder's GRU cell runs once per step)."""
        if self.gamma is None:
            yield
            return
        with hashing.cached_weights(self):
            yield

    def _encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] float in [-1, 1] -> sequence [B, L, D]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if self.input_norm is not None:
            images = self.input_norm(images)
        if self.rectifier is not None and self.rectify:
            x = self.rectifier(images)
        elif tuple(images.shape[2:]) != self.config.tps_output_hw:
            x = nn.functional.interpolate(images, size=self.config.tps_output_hw, mode="bilinear")
        else:
            x = images
        features = self.encoder(x)
        if isinstance(self.encoder, ViTEncoder):
            return features if self.sequence is None else self.sequence(self.encoder.columns(features))
        return self.sequence(features)

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced logits.

        images: [B, 3, H, W] float32 in [-1, 1] (the config's input_hw; resized to the encoder's
        otherwise). targets: [B, T] long (ids, then EOS, then PAD).
        The decoder reads the start symbol at step 0, then targets[:, :-1]. Returns [B, T, num_classes] float.
        """
        with self._weights_cached():
            return self.decoder(self._encode(images), targets)

    def training_loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced cross entropy, plus ``ctc_weight`` x the CTC loss of the auxiliary head.

        images: [B, 3, H, W] float in [-1, 1]; targets: [B, T] long (ids, then EOS, then PAD).
        Returns a scalar float32 tensor.
        """
        with self._weights_cached():
            feats = self._encode(images)
            loss = sequence_loss(self.decoder(feats, targets).float(), targets)
            if self.ctc_head is None:
                return loss
            log_probs = F.log_softmax(self.ctc_head(feats).float(), dim=2).transpose(0, 1)  # [L, B, C]
            symbols = targets > PAD  # drop EOS and PAD
            ctc = F.ctc_loss(
                log_probs,
                targets[symbols],
                torch.full((targets.shape[0],), log_probs.shape[0], dtype=torch.long, device=targets.device),
                symbols.sum(1),
                blank=PAD,
                zero_infinity=True,
            )
        return loss + self.config.ctc_weight * ctc

    @property
    def image_options(self) -> dict:
        """How data for this model is read: ``make_loader``'s input_hw, keep_aspect and alphabet."""
        return {"input_hw": self.config.input_hw, "keep_aspect": self.config.keep_aspect,
                "alphabet": self.alphabet}

    @torch.no_grad()
    def predict_scored(
        self, images: Tensor, beam_width: int = 1, max_len: int = MAX_SEQ_LEN
    ) -> tuple[list[list[int]], list[float]]:
        """``predict`` and each sequence's log-probability (EOS included): its confidence's log."""
        was_training = self.training
        self.eval()
        try:
            with self._weights_cached():
                return self.decoder.decode_scored(self._encode(images), beam_width, max_len)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, images: Tensor, beam_width: int = 5, max_len: int = MAX_SEQ_LEN) -> list[list[int]]:
        """Class ids per image, without EOS; beam_width=1 is greedy. Runs in eval mode, then restores it.

        images: [B, 3, H, W] float32 in [-1, 1] (the config's input_hw; resized to the encoder's
        otherwise).
        """
        was_training = self.training
        self.eval()
        try:
            with self._weights_cached():
                return self.decoder.decode(self._encode(images), beam_width, max_len)
        finally:
            self.train(was_training)


def resolve_preset(preset: str | ModelConfig) -> ModelConfig:
    """The config of a preset name (or the config itself). Raises ValueError listing the valid names."""
    if isinstance(preset, ModelConfig):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}") from None


def same_weights(a: str | ModelConfig, b: str | ModelConfig) -> bool:
    """Whether two presets hold the same weights and differ at most in the image size they read
    (``input_hw``, ``tps_output_hw``): a model file of one then starts the other (``--init``)."""
    a, b = resolve_preset(a), resolve_preset(b)
    return dataclasses.replace(a, name=b.name, input_hw=b.input_hw, tps_output_hw=b.tps_output_hw) == b


def build_model(
    preset: str | ModelConfig, key: bytes, gamma: float | None = 1.0, alphabet: str | None = None
) -> Recognizer:
    """A recognizer initialized from the federation key, hashed with ratio ``gamma``.

    ``alphabet`` (a name in ``recognizer.charset.ALPHABETS``) replaces the preset's.

    The plain initialization is drawn from derive_seed(key, 'init') inside a forked RNG, so the
    global torch seed is untouched and every edge holding the key gets the same W_0. gamma=None
    leaves the model unhashed (baselines, benchmarks).
    """
    config = resolve_preset(preset)
    if alphabet is not None:
        config = dataclasses.replace(config, alphabet=get_alphabet(alphabet).name)
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1] or None, got {gamma}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(key, "init"))
        model = Recognizer(config)
        model.reset_parameters()
    if gamma is not None:
        hashing.hash_model(model, key, gamma)
        model.gamma = gamma
    log.debug("built %s (gamma=%s): %d parameters", config.name, gamma, count_params(model))
    return model


def count_params(module: nn.Module) -> int:
    """Trainable parameters (for a hashed module: the real vectors plus batch norm)."""
    return sum(p.numel() for p in module.parameters())


def model_info(preset: str, gamma: float | None) -> dict:
    """Sizes of a preset at one hashing ratio, for ``recognizer info --json``.

    Returns {'preset', 'gamma', 'virtual_params', 'real_params', 'state_bytes', 'layers'}, where
    'layers' lists every weight tensor as {'name', 'virtual', 'real', 'ratio'} (batch norm: ratio 1).
    """
    config = resolve_preset(preset)
    model = build_model(config, bytes(32), gamma=gamma)  # sizes do not depend on the key
    hashed = {h.name: h for h in hashing.hashed_layers(model)}
    layers = []
    for name, p in model.named_parameters():
        virtual = real = p.numel()
        if name.endswith(hashing.REAL_SUFFIX):
            name = name[: -len(hashing.REAL_SUFFIX)]
            virtual = hashed[name].virtual
        layers.append({"name": name, "virtual": virtual, "real": real, "ratio": real / virtual})
    return {
        "preset": config.name,
        "gamma": gamma,
        "virtual_params": sum(layer["virtual"] for layer in layers),
        "real_params": sum(layer["real"] for layer in layers),
        "state_bytes": 4 * sum(state_lengths(model)),  # float32, BN buffers included
        "layers": layers,
    }
