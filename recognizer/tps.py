"""ASTER's rectification: a thin-plate-spline spatial transformer and its localization network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _ctrl_points(num_points: int, margin_x: float, margin_y: float) -> Tensor:
    """Control points on the top and bottom edges of the unit square, (x, y) each: [num_points, 2] float64."""
    if num_points < 4 or num_points % 2:
        raise ValueError(f"TPS needs an even number of control points >= 4, got {num_points}")
    xs = torch.linspace(margin_x, 1.0 - margin_x, num_points // 2, dtype=torch.float64)
    top = torch.stack([xs, torch.full_like(xs, margin_y)], 1)
    bottom = torch.stack([xs, torch.full_like(xs, 1.0 - margin_y)], 1)
    return torch.cat([top, bottom], 0)


def _radial(points: Tensor, ctrl: Tensor) -> Tensor:
    """TPS radial basis U(r) = r^2 log r between [P, 2] points and [N, 2] control points: [P, N]."""
    d2 = (points[:, None, :] - ctrl[None, :, :]).pow(2).sum(-1)
    # 0.5 * r^2 * log(r^2) == r^2 log r; U(0) = 0 by continuity.
    return torch.where(d2 > 0, 0.5 * d2 * torch.log(d2.clamp_min(1e-300)), torch.zeros_like(d2))


class TPSGrid(nn.Module):
    """Maps source control points to a sampling grid through a thin-plate spline (ASTER, Shi et al. 2018).

    The spline's target control points and the output pixel grid are fixed, so the whole linear map
    from source control points to sampling coordinates is precomputed as one [H*W, N] matrix.
    """

    def __init__(self, output_hw: tuple[int, int], num_points: int, margins: tuple[float, float]) -> None:
        super().__init__()
        self.output_hw = output_hw
        n = num_points
        ctrl = _ctrl_points(n, *margins)
        kernel = torch.zeros(n + 3, n + 3, dtype=torch.float64)
        kernel[:n, :n] = _radial(ctrl, ctrl)
        kernel[:n, n] = 1.0
        kernel[n, :n] = 1.0
        kernel[:n, n + 1 :] = ctrl
        kernel[n + 1 :, :n] = ctrl.t()
        h, w = output_hw
        ys, xs = torch.meshgrid(
            torch.linspace(0.0, 1.0, h, dtype=torch.float64),
            torch.linspace(0.0, 1.0, w, dtype=torch.float64),
            indexing="ij",
        )
        pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)  # [H*W, 2] as (x, y)
        pix_repr = torch.cat([_radial(pix, ctrl), torch.ones(h * w, 1, dtype=torch.float64), pix], 1)
        # The source points are padded with three zero rows, so only the first n columns matter.
        mapping = (pix_repr @ torch.linalg.inv(kernel))[:, :n]  # [H*W, N]
        # Not persistent: derived from the config, never part of the exported state.
        self.register_buffer("mapping", mapping.float(), persistent=False)

    def forward(self, ctrl_points: Tensor) -> Tensor:
        """Sampling grid for ``grid_sample``.

        ctrl_points: [B, N, 2] float, source control points as (x, y) in [0, 1].
        Returns [B, H, W, 2] float in [-1, 1].
        """
        b = ctrl_points.shape[0]
        h, w = self.output_hw
        # Always float32: under bf16 autocast the coordinates would be off by up to a pixel.
        with torch.autocast(ctrl_points.device.type, enabled=False):
            coords = torch.matmul(self.mapping, ctrl_points.float())  # [B, H*W, 2]
        grid = coords.view(b, h, w, 2).clamp(0.0, 1.0)
        return grid * 2.0 - 1.0


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv (with bias, as in ASTER's localization net), batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LocalizationNet(nn.Module):
    """Predicts the source control points from a downsampled image (ASTER's STN head).

    Six 3x3 conv blocks, each of the first five followed by 2x2 max pooling, then two linear layers.
    """

    def __init__(
        self, input_hw: tuple[int, int], widths: tuple[int, ...], fc_dim: int, num_points: int
    ) -> None:
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"the localization net has 6 conv blocks, got widths {widths}")
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(widths):
            layers.append(_conv_block(cin, cout))
            if i < 5:
                layers.append(nn.MaxPool2d(2, 2))
            cin = cout
        self.convs = nn.Sequential(*layers)
        h, w = input_hw[0] // 32, input_hw[1] // 32
        if h < 1 or w < 1:
            raise ValueError(f"localization input {input_hw} is too small for five 2x poolings")
        self.fc1 = nn.Linear(widths[-1] * h * w, fc_dim)
        self.bn = nn.BatchNorm1d(fc_dim)
        self.fc2 = nn.Linear(fc_dim, num_points * 2)
        # Its bias is the identity frame of control points; a hashed bias would be permuted by the
        # index map and the rectifier would start from a scrambled warp that training never untangles.
        self.fc2.hash_exempt = True
        self.num_points = num_points

    def reset_parameters(self, margin: float = 0.01) -> None:
        """ASTER's init: He-normal convs, a near-zero fc1 and an fc2 that outputs a fixed identity frame."""
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc1.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(_ctrl_points(self.num_points, margin, margin).reshape(-1).float())

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, h, w] float (the downsampled image). Returns control points [B, N, 2] float."""
        f = self.convs(x).flatten(1)  # [B, C*h'*w']
        f = F.relu(self.bn(self.fc1(f)))
        return self.fc2(f).view(-1, self.num_points, 2)


class Rectifier(nn.Module):
    """TPS-STN: localize control points on a small copy, then resample the full image to ``output_hw``."""

    def __init__(
        self,
        loc_input_hw: tuple[int, int],
        output_hw: tuple[int, int],
        num_points: int,
        margins: tuple[float, float],
        widths: tuple[int, ...],
        fc_dim: int,
    ) -> None:
        super().__init__()
        self.loc_input_hw = loc_input_hw
        self.localization = LocalizationNet(loc_input_hw, widths, fc_dim, num_points)
        self.grid = TPSGrid(output_hw, num_points, margins)

    def forward(self, images: Tensor) -> Tensor:
        """images: [B, 3, H, W] float in [-1, 1]. Returns the rectified images [B, 3, h_out, w_out]."""
        small = F.interpolate(images, size=self.loc_input_hw, mode="bilinear", align_corners=False)
        ctrl = self.localization(small)
        grid = self.grid(ctrl).to(images.dtype)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
