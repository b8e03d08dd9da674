"""Anchor generation.

Shape shorthand: A anchors per cell (len(sizes) * len(aspect_ratios) of a level), Hl, Wl the size
of feature level l. Anchors are xyxy in padded-batch pixels, ordered cell-major then anchor:
index = (y * Wl + x) * A + a, the same order the RPN head's outputs are flattened in.
"""

from __future__ import annotations

import torch
from torch import nn


def cell_anchors(sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Zero-centred anchors of one level. Returns Tensor[A, 4], A = len(ratios) * len(sizes),
    ratio-major (as torchvision), rounded to integers."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)  # aspect ratio is h / w, area kept at size**2
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for every level of a padded batch; identical for all images of the batch."""

    def __init__(self, *, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...]):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} anchor size tuples but {len(aspect_ratios)} ratio tuples")
        self.base = [cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        return [b.shape[0] for b in self.base]

    def forward(self, batch_hw: tuple[int, int], feature_shapes: list[tuple[int, int]],
                device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """batch_hw: padded (H, W); feature_shapes: [(Hl, Wl)]. Returns [Tensor[Hl*Wl*A, 4]] per level."""
        if len(feature_shapes) != len(self.base):
            raise ValueError(f"{len(feature_shapes)} feature maps but anchors for {len(self.base)} levels")
        out = []
        for (fh, fw), base in zip(feature_shapes, self.base):
            stride_h, stride_w = batch_hw[0] // fh, batch_hw[1] // fw
            shift_x = torch.arange(fw, device=device, dtype=torch.int64) * stride_w
            shift_y = torch.arange(fh, device=device, dtype=torch.int64) * stride_h
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4).to(dtype)  # (Hl*Wl, 1, 4)
            out.append((shifts + base.to(device=device, dtype=dtype).reshape(1, -1, 4)).reshape(-1, 4))
        return out
