"""IResNet (insightface ``recognition/arcface_torch/backbones/iresnet.py``): iresnet18..100.

The "improved" pre-activation-style residual network of ArcFace. Kept from insightface:
- stem conv3x3 (stride 1) - BN - PReLU; no max-pool;
- IBasicBlock: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, + shortcut (conv1x1+BN when
  the shape changes); no activation after the addition;
- four stages of 64, 128, 256, 512 channels, each with stride 2;
- head: BN2d - Dropout - flatten - Linear - BatchNorm1d whose weight (scale) is fixed at 1 and
  not trained, so the embedding's per-dimension scale comes from the Linear alone.
Different: kaiming-normal conv init (insightface uses N(0, 0.1)), the Linear's input width
follows input_size, and no fp16 autocast inside forward (the trainer owns precision).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from virface.backbones.registry import check_input_size, init_face_backbone, register_backbone


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn3(self.conv2(out))
        return out + identity


class IResNet(nn.Module):
    """IResNet: ``(B, 3, input_size, input_size)`` float -> ``(B, feat_len)`` embedding.

    ``map_size`` (= input_size / 16) is the side of the final map the head flattens.
    """

    def __init__(self, layers: Sequence[int], feat_len: int = 512, input_size: int = 112,
                 dropout: float = 0.0):
        super().__init__()
        check_input_size(input_size)
        self.map_size = input_size // 16
        self._inplanes = 64
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.map_size ** 2, feat_len)
        self.features = nn.BatchNorm1d(feat_len, eps=1e-5)

        init_face_backbone(self)
        # As insightface: the embedding BN only centres and whitens, its scale stays 1.
        self.features.weight.requires_grad_(False)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        layers = [IBasicBlock(self._inplanes, planes, 2, downsample)]
        self._inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> final map ``(B, 512, S / 16, S / 16)`` (before the head's BN)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float -> ``(B, feat_len)`` embedding (not normalised)."""
        x = torch.flatten(self.bn2(self.forward_features(x)), 1)
        return self.features(self.fc(self.dropout(x)))


@register_backbone("iresnet18")
def iresnet18(feat_len: int, input_size: int) -> IResNet:
    return IResNet([2, 2, 2, 2], feat_len, input_size)


@register_backbone("iresnet34")
def iresnet34(feat_len: int, input_size: int) -> IResNet:
    return IResNet([3, 4, 6, 3], feat_len, input_size)


@register_backbone("iresnet50")
def iresnet50(feat_len: int, input_size: int) -> IResNet:
    return IResNet([3, 4, 14, 3], feat_len, input_size)


@register_backbone("iresnet100")
def iresnet100(feat_len: int, input_size: int) -> IResNet:
    return IResNet([3, 13, 30, 3], feat_len, input_size)
