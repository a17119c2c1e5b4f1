"""The VirFace reference's face ResNet (sandwichfish/VirFace model/resnet.py): resnet18..152.

Differences from the torchvision ImageNet ResNet, all kept from the reference:
- 7x7 stride-1 stem convolution with padding 1, BN, ReLU and **no max-pool**;
- four stages, each with stride 2 (layer1 included), so the input is halved four times;
- head: flatten the whole final map -> Linear -> BatchNorm1d(feat_len); no pooling, no dropout.

Padding 1 (not 3) on the 7x7 stem is the reference's: it shrinks the input by 4 pixels, and since
every stride-2 3x3/1x1 convolution here maps n to ceil(n/2), a 112 input still ends as a 7x7 map
(112 -> 108 -> 54 -> 27 -> 14 -> 7); in general any input_size = 16k ends as k x k, exactly as
with a size-preserving padding 3 (112 -> 56 -> 28 -> 14 -> 7). ``stem_padding`` selects either.
The torchvision ImageNet weights do not fit this shape, so there are no pretrained weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from virface.backbones.registry import check_input_size, init_face_backbone, register_backbone
from virface.errors import ConfigError


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision (v1.5) Bottleneck: 1x1 - 3x3(stride) - 1x1 (x4 channels), + shortcut, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def face_resnet_map_size(input_size: int, stem_padding: int = 1) -> int:
    """Side of the final (layer4) feature map for a square input of side ``input_size``."""
    size = input_size + 2 * stem_padding - 7 + 1
    for _ in range(4):
        size = (size + 1) // 2  # 3x3 pad 1 or 1x1 pad 0, stride 2: n -> ceil(n / 2)
    return size


class FaceResNet(nn.Module):
    """Face ResNet: ``(B, 3, input_size, input_size)`` float -> ``(B, feat_len)`` embedding.

    ``map_size`` is the side of the final feature map that the head flattens
    (``input_size / 16``); the flatten width is ``512 * expansion * map_size**2``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 feat_len: int = 512, input_size: int = 112, stem_padding: int = 1):
        super().__init__()
        check_input_size(input_size)
        if stem_padding not in (1, 3):
            raise ConfigError(f"stem_padding: {stem_padding!r}; allowed: 1 (the reference's) "
                              "or 3 (size-preserving)")
        self.map_size = face_resnet_map_size(input_size, stem_padding)
        self._inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=1, padding=stem_padding, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1])
        self.layer3 = self._make_layer(block, 256, layers[2])
        self.layer4 = self._make_layer(block, 512, layers[3])
        self.feature = nn.Linear(512 * block.expansion * self.map_size ** 2, feat_len)
        self.bn_feature = nn.BatchNorm1d(feat_len)

        init_face_backbone(self)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int,
                    blocks: int) -> nn.Sequential:
        stride = 2  # every stage halves, layer1 included: there is no max-pool to do it
        downsample = nn.Sequential(
            nn.Conv2d(self._inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                      bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
        layers = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> final map ``(B, 512 * expansion, S / 16, S / 16)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float -> ``(B, feat_len)`` embedding (not normalised)."""
        x = torch.flatten(self.forward_features(x), 1)
        return self.bn_feature(self.feature(x))


@register_backbone("resnet18")
def resnet18(feat_len: int, input_size: int) -> FaceResNet:
    return FaceResNet(BasicBlock, [2, 2, 2, 2], feat_len, input_size)


@register_backbone("resnet34")
def resnet34(feat_len: int, input_size: int) -> FaceResNet:
    return FaceResNet(BasicBlock, [3, 4, 6, 3], feat_len, input_size)


@register_backbone("resnet50")
def resnet50(feat_len: int, input_size: int) -> FaceResNet:
    return FaceResNet(Bottleneck, [3, 4, 6, 3], feat_len, input_size)


@register_backbone("resnet101")
def resnet101(feat_len: int, input_size: int) -> FaceResNet:
    return FaceResNet(Bottleneck, [3, 4, 23, 3], feat_len, input_size)


@register_backbone("resnet152")
def resnet152(feat_len: int, input_size: int) -> FaceResNet:
    return FaceResNet(Bottleneck, [3, 8, 36, 3], feat_len, input_size)
