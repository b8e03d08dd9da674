"""Feature Pyramid Network (Lin et al. 2017) with the P6 max-pool level used by Faster R-CNN.

Shape shorthand: N images, C_i channels of input level i, Hi, Wi its size, D the FPN width.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Top-down pathway with lateral 1x1 convs and 3x3 output convs.

    Args:
        in_channels: channels of each input level, finest first.
        out_channels: D.
        extra_pool: append "pool" = max_pool(P_last, kernel 1, stride 2) (P6 in the FPN paper).
    """

    def __init__(self, *, in_channels: list[int], out_channels: int, extra_pool: bool = True):
        super().__init__()
        # Sequential wrappers keep torchvision's key layout (inner_blocks.i.0.weight).
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels
        )
        self.extra_pool = extra_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], names: list[str],
                mask: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                strides: list[int] | None = None) -> OrderedDict[str, torch.Tensor]:
        """feats: [(N, C_i, Hi, Wi)] finest first -> {name: (N, D, Hi, Wi)} (+ "pool").
        mask(x, stride), with each level's stride: applied to every map a conv reads or returns
        (see model/backbones/padding.py)."""
        def m(t: torch.Tensor, level: int) -> torch.Tensor:
            return t if mask is None else mask(t, strides[level])

        last = m(self.inner_blocks[-1](feats[-1]), -1)
        results = [m(self.layer_blocks[-1](last), -1)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            last = m(lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest"), i)
            results.insert(0, m(self.layer_blocks[i](last), i))
        out = OrderedDict(zip(names, results))
        if self.extra_pool:
            out["pool"] = F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)
        return out
