"""VGG16 up to conv5_3 (stride 16, 512 channels): the backbone of the Faster R-CNN paper."""

from __future__ import annotations

import torch
from torch import nn

from model.backbones.norm import make_norm

# Channels per conv; "M" is a 2x2 max-pool. The fifth pool is dropped: RoIs pool from conv5_3.
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG16Body(nn.Module):
    """forward: (N, 3, H, W) -> [(N, 512, H/16, W/16)]. Keys follow torchvision's ``vgg16().features``
    when norm is "none"."""

    def __init__(self, *, norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if norm != "none":
                layers.append(make_norm(norm, v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        self.features = nn.Sequential(*layers)
        self.out_channels_list = [512]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(x)]
