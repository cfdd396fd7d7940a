"""Encoder building blocks: ASTER's ResNet, a height-collapsing ShuffleNetV2, and the BiLSTM on top."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


class AsterBlock(nn.Module):
    """ASTER's residual block: 1x1 conv (carrying the stride), 3x3 conv, projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != (1, 1) or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ASTER's ResNet-45: a 3x3 stem, then five stages; 32x100 in, a 1x25 feature map out.

    widths: stem width then the five stage widths (ASTER: 32, 32, 64, 128, 256, 512).
    depths: blocks per stage (ASTER: 3, 4, 6, 6, 3).
    """

    # The first two stages halve both sides; the last three collapse the height only.
    STRIDES = ((2, 2), (2, 2), (2, 1), (2, 1), (2, 1))

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) != 6 or len(depths) != 5:
            raise ValueError(f"ResNet encoder needs 6 widths and 5 depths, got {widths} and {depths}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), *_bn_relu(widths[0]))
        stages = []
        cin = widths[0]
        for cout, depth, stride in zip(widths[1:], depths, self.STRIDES, strict=True):
            blocks = [AsterBlock(cin, cout, stride)]
            blocks += [AsterBlock(cout, cout, (1, 1)) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def reset_parameters(self) -> None:
        """He-normal (fan-out) convs and unit batch norms, as in aster.pytorch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, 32, W] float. Returns [B, C, 1, W/4]."""
        return self.stages(self.stem(x))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet): x [B, C, H, W] -> same shape."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w)  # [B, g, C/g, H, W]
    return x.transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018).

    Stride 1: split the channels, transform one half (1x1, depthwise 3x3, 1x1), concatenate, shuffle.
    Strided: both branches see the whole input and each gives half of the output channels.
    """

    def __init__(self, cin: int, cout: int, stride: tuple[int, int]) -> None:
        super().__init__()
        if cout % 2:
            raise ValueError(f"ShuffleNetV2 unit needs an even output width, got {cout}")
        self.downsample = stride != (1, 1) or cin != cout
        half = cout // 2
        b2_in = cin if self.downsample else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(b2_in, half, 1, bias=False),
            *_bn_relu(half),
            nn.Conv2d(half, half, 3, stride=stride, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            *_bn_relu(half),
        )
        self.branch1: nn.Module | None = None
        if self.downsample:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                *_bn_relu(half),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            keep, x2 = x.chunk(2, dim=1)
            out = torch.cat([keep, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetEncoder(nn.Module):
    """ShuffleNetV2 with its strides adapted to text: 32x100 in, a 1x25 feature map out.

    widths: stem, the three stage widths and the final 1x1 conv (ShuffleNetV2 2.0x: 24, 244, 488, 976,
    2048; FedOCR-Hash uses a 1024-wide final conv, see ``recognizer.model.PRESETS``).
    depths: units per stage (ShuffleNetV2: 4, 8, 4).
    """

    # Stem conv and max pooling halve both sides (32x100 -> 8x25); each stage then halves the height only.
    STAGE_STRIDES = ((2, 1), (2, 1), (2, 1))

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 3:
            raise ValueError(f"ShuffleNet encoder needs 5 widths and 3 depths, got {widths} and {depths}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            *_bn_relu(widths[0]),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        cin = widths[0]
        for cout, depth, stride in zip(widths[1:4], depths, self.STAGE_STRIDES, strict=True):
            units = [ShuffleUnit(cin, cout, stride)] + [
                ShuffleUnit(cout, cout, (1, 1)) for _ in range(depth - 1)
            ]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Conv2d(cin, widths[4], 1, bias=False), *_bn_relu(widths[4]))
        self.out_channels = widths[4]

    def reset_parameters(self) -> None:
        """He-normal (fan-out) convs and unit batch norms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Depthwise convs: fan-out per group, so the variance does not shrink with width.
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, 32, W] float. Returns [B, C, 1, W/4]."""
        return self.head(self.stages(self.stem(x)))


class PolarityNorm(nn.Module):
    """Grey, standardized per image, text bright on dark whatever its colours: the CPU presets' input.

    Scene text comes in any colour on any background, dark on light as often as light on dark. A
    small encoder learning from scratch spends thousands of steps on that before it reads; this
    parameter-free layer takes it away (benchmarks/learning.py measures it). The border (two rows at
    the top and bottom, two columns at the left) stands for the background: where it is brighter
    than the image on average, the image is negated.
    """

    EPS = 0.05  # in [-1, 1] units: a blank image stays near zero instead of amplifying its noise

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] float in [-1, 1]. Returns [B, 3, H, W], the grey channel three times."""
        grey = x.mean(1, keepdim=True)  # [B, 1, H, W]
        border = torch.cat(
            [grey[:, :, :2].flatten(1), grey[:, :, -2:].flatten(1), grey[:, :, :, :2].flatten(1)], 1
        ).mean(1)
        mean = grey.mean((2, 3), keepdim=True)
        sign = torch.where(border > mean.flatten(), -1.0, 1.0).to(x.dtype).view(-1, 1, 1, 1)
        out = (grey - mean) / (grey.std((2, 3), keepdim=True) + self.EPS) * sign
        return out.expand(-1, 3, -1, -1)


class SequenceEncoder(nn.Module):
    """Collapses the 1-high feature map into a sequence and runs ASTER's 2-layer BiLSTM over it.

    With ``skip``, a linear projection of the CNN features is added to the BiLSTM's output, so the
    encoder gets a direct gradient while the freshly initialized LSTM still scrambles its own.
    """

    def __init__(self, in_channels: int, hidden: int, layers: int, skip: bool = False) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_channels, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.skip = nn.Linear(in_channels, 2 * hidden) if skip else None
        self.out_channels = 2 * hidden

    def forward(self, fmap: Tensor) -> Tensor:
        """fmap: [B, C, 1, L] float. Returns [B, L, 2*hidden]."""
        if fmap.shape[2] != 1:
            raise ValueError(f"encoder output must be 1 high, got {tuple(fmap.shape)}")
        seq = fmap.squeeze(2).transpose(1, 2)  # [B, L, C]
        out, _ = self.rnn(seq)
        return out if self.skip is None else out + self.skip(seq)
