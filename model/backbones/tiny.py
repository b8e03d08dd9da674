"""A small four-stage conv net (strides 4..32) for tests, demos and CPU training from scratch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.backbones.norm import make_norm

WIDTHS = (24, 48, 96, 160)
BLOCK_STRIDES = (2, 4, 4, 4, 8, 8, 16, 16, 32, 32)  # output stride of each conv block, stem first


def _conv(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm == "none"),
                         make_norm(norm, cout), nn.ReLU(inplace=True))


class TinyBody(nn.Module):
    """forward: (N, 3, H, W) -> [C2 (H/4), C3 (H/8), C4 (H/16), C5 (H/32)]."""

    def __init__(self, *, norm: str = "gn"):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 16, 2, norm), _conv(16, WIDTHS[0], 2, norm))
        stages = []
        cin = WIDTHS[0]
        for i, w in enumerate(WIDTHS):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_conv(cin, w, stride, norm), _conv(w, w, 1, norm)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_channels_list = list(WIDTHS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, mask: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
        """mask(x, stride): applied after every conv block (see model/backbones/padding.py)."""
        outs = []
        for i, block in enumerate([*self.stem, *(b for stage in self.stages for b in stage)]):
            x = block(x)
            if mask is not None:
                x = mask(x, BLOCK_STRIDES[i])
            if i >= len(self.stem) and (i - len(self.stem)) % 2 == 1:  # end of a stage
                outs.append(x)
        return outs
