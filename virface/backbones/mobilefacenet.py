"""MobileFaceNet (Chen et al., 2018): a small face backbone that runs well on a CPU.

Layout (the paper's Table 1, input 112):
    conv3x3 s2 (64) -> depthwise conv3x3 (64)
    -> bottlenecks (t, c, n, s): (2, 64, 5, 2) (4, 128, 1, 2) (2, 128, 6, 1) (4, 128, 1, 2)
       (2, 128, 2, 1)
    -> conv1x1 (512) -> linear global depthwise conv (GDC, kernel input_size / 16)
    -> Linear (512 -> feat_len) -> BatchNorm1d(feat_len)
Bottlenecks are MobileNetV2 inverted residuals with PReLU and a linear projection. Three stride-2
stages after the stride-2 stem downsample by 16 overall, so any input_size divisible by 16 works.

``mobilefacenet_s`` halves every width, keeps one or two blocks per stage and uses smaller
expansions: it is meant for the 32x32 to 48x48 synthetic images of demos and tests on a couple of
CPU cores.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from virface.backbones.registry import check_input_size, init_face_backbone, register_backbone
from virface.errors import ConfigError

# (expansion t, output channels c, repeats n, first stride s) per bottleneck stage.
MOBILEFACENET_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1),
)
# Same strides, one or two blocks per stage and smaller expansions: on a CPU the cost is in the
# elementwise BN/PReLU passes over the expanded maps, largest in the first (highest-resolution)
# stage, hence expansion 1 there. Measured: forward+backward of batch 64 at 32x32 in ~35 ms
# on 2 cores (width 0.5), against ~50 ms with the paper's expansions.
MOBILEFACENET_S_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 64, 1, 2), (2, 128, 1, 2), (2, 128, 2, 1), (2, 128, 1, 2), (2, 128, 1, 1),
)


def _scaled(channels: int, width: float) -> int:
    # Round to a multiple of 8, as MobileNets do, so that scaled widths stay vector-friendly.
    return max(8, int(channels * width + 4) // 8 * 8)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """Conv (no bias) - BN [- PReLU]; padding keeps the size at stride 1."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand - 3x3 depthwise(stride) - 1x1 linear projection.

    Each conv is followed by BN, the first two also by PReLU. The shortcut is used only when the
    shape is unchanged (stride 1, same channels).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        # With expansion 1 the 1x1 expand would map in_ch to in_ch: skipped, as in MobileNetV2.
        expand = [_conv_bn(in_ch, hidden, 1)] if expansion != 1 else []
        self.block = nn.Sequential(
            *expand,
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, out_ch, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``(B, 3, input_size, input_size)`` float -> ``(B, feat_len)`` embedding.

    ``width`` scales every channel count (rounded to a multiple of 8); ``stages`` lists
    ``(expansion, channels, repeats, stride)`` per bottleneck stage and must halve three times.
    ``map_size`` (= input_size / 16) is the GDC kernel size.
    """

    def __init__(self, feat_len: int = 512, input_size: int = 112, width: float = 1.0,
                 stages: Sequence[tuple[int, int, int, int]] = MOBILEFACENET_STAGES,
                 last_channels: int = 512):
        super().__init__()
        check_input_size(input_size)
        strides = [s for _, _, _, s in stages]
        if sorted(strides) != [1] * (len(strides) - 3) + [2, 2, 2]:
            raise ConfigError(f"stages: strides {strides} must contain three 2s and otherwise 1s")
        self.map_size = input_size // 16
        stem_ch = _scaled(64, width)
        self.stem = nn.Sequential(
            _conv_bn(3, stem_ch, 3, stride=2),
            _conv_bn(stem_ch, stem_ch, 3, groups=stem_ch),  # depthwise
        )
        blocks: list[nn.Module] = []
        in_ch = stem_ch
        for expansion, channels, repeats, stride in stages:
            out_ch = _scaled(channels, width)
            for i in range(repeats):
                blocks.append(Bottleneck(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last_ch = _scaled(last_channels, width)
        self.conv_last = _conv_bn(in_ch, last_ch, 1)
        # Global depthwise conv: a learned per-position weighting of the final map, which faces
        # need (the centre matters more than the corners) and global average pooling lacks.
        self.gdc = nn.Sequential(
            nn.Conv2d(last_ch, last_ch, self.map_size, groups=last_ch, bias=False),
            nn.BatchNorm2d(last_ch),
        )
        self.linear = nn.Linear(last_ch, feat_len, bias=False)
        self.features = nn.BatchNorm1d(feat_len)

        init_face_backbone(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> final map ``(B, last_channels * width, S / 16, S / 16)``."""
        return self.conv_last(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float -> ``(B, feat_len)`` embedding (not normalised)."""
        x = torch.flatten(self.gdc(self.forward_features(x)), 1)
        return self.features(self.linear(x))


@register_backbone("mobilefacenet")
def mobilefacenet(feat_len: int, input_size: int) -> MobileFaceNet:
    return MobileFaceNet(feat_len, input_size)


@register_backbone("mobilefacenet_s")
def mobilefacenet_s(feat_len: int, input_size: int) -> MobileFaceNet:
    return MobileFaceNet(feat_len, input_size, width=0.5, stages=MOBILEFACENET_S_STAGES)
