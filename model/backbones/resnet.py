"""ResNet-50/101 (v1.5: stride on the 3x3 conv) returning C2..C5, as torchvision lays it out.

Shape shorthand: N images; C2..C5 have strides 4, 8, 16, 32 and 256, 512, 1024, 2048 channels.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbones.norm import make_norm

DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, *, stride: int, norm: str):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """Stem + layer1..layer4. forward: (N, 3, H, W) -> [C2, C3, C4, C5]."""

    def __init__(self, *, depth: str = "resnet50", norm: str = "frozen_bn"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown resnet {depth!r}; choose one of {', '.join(DEPTHS)}")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = 64
        for i, (blocks, width) in enumerate(zip(DEPTHS[depth], (64, 128, 256, 512)), start=1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_ch, width, stride=2 if (b == 0 and i > 1) else 1, norm=norm))
                in_ch = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.out_channels_list = [256, 512, 1024, 2048]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]
