"""MobileNetV3-Large feature extractor laid out as torchvision's ``mobilenet_v3_large().features``.

Faster R-CNN uses the outputs of block 13 (160 ch) and block 16 (960 ch); both have stride 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones.norm import make_norm

# (in, kernel, expanded, out, squeeze-excite, activation, stride) of each inverted residual block.
LARGE_BLOCKS = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]
RETURN_BLOCKS = (13, 16)


def _divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_norm_act(cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1, norm: str,
                  act: type[nn.Module] | None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False),
              make_norm(norm, cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act_name: str, stride: int, norm: str):
        super().__init__()
        act = nn.Hardswish if act_name == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_norm_act(cin, exp, 1, norm=norm, act=act))
        layers.append(conv_norm_act(exp, exp, k, stride=stride, groups=exp, norm=norm, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4)))
        layers.append(conv_norm_act(exp, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3Body(nn.Sequential):
    """forward: (N, 3, H, W) -> [(N, 160, H/32, W/32), (N, 960, H/32, W/32)]."""

    def __init__(self, *, norm: str = "frozen_bn"):
        layers: list[nn.Module] = [conv_norm_act(3, 16, 3, stride=2, norm=norm, act=nn.Hardswish)]
        layers += [InvertedResidual(*cfg, norm=norm) for cfg in LARGE_BLOCKS]
        layers.append(conv_norm_act(160, 960, 1, norm=norm, act=nn.Hardswish))
        super().__init__(*layers)
        self.out_channels_list = [160, 960]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self):
            x = layer(x)
            if i in RETURN_BLOCKS:
                outs.append(x)
        return outs
