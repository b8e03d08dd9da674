"""Slow, obviously-right twins of the fast NMS and RoIAlign kernels, in plain torch.

Shape shorthand: N boxes, K RoIs, C channels, H, W feature size, (oh, ow) output size,
(gy, gx) sampling points per bin.

The fast kernels (nms.py: tiled fixed-point suppression; roi_align.py: separable taps summed by
embedding_bag) are tested against these over seeded random inputs at every dtype they accept.
Here one kept box at a time suppresses the rest, and one RoI at a time samples its bins; nothing
is tiled, merged, chunked or reordered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batched_nms_reference", "nms_reference", "roi_align_reference"]


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, torchvision's CPU loop written with tensors.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2). Compared in float32 (float64 boxes in float64),
            with torchvision's float operations in its order, so IoUs agree bit for bit.
        scores (Tensor[N]): visited by decreasing score; ties in index order.
        iou_threshold: a box is dropped when its IoU with a kept box is > iou_threshold (in double).
    Returns:
        Tensor[K] int64: kept indices, by decreasing score.
    """
    return batched_nms_reference(boxes, scores, torch.zeros(boxes.shape[0], dtype=torch.int64), iou_threshold)


def batched_nms_reference(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS in which a box only suppresses boxes of its own idxs value (class).

    Args and returns as nms_reference, with idxs (Tensor[N] integer).
    """
    b = boxes.double() if boxes.dtype == torch.float64 else boxes.float()
    b, idxs = b.cpu(), idxs.cpu()
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    suppressed = torch.zeros(b.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        suppressed |= (iou.double() > iou_threshold) & (idxs == idxs[i])
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def _axis_samples(start: float, side: float, n_bins: int, grid: int, size: int):
    """Sample positions of one RoI along one axis -> (low, high, w_low, w_high, valid), each
    (n_bins * grid,), bin-major: torchvision's bilinear_interpolate for every sample."""
    bin_size = side / n_bins
    p = torch.arange(n_bins, dtype=torch.float64)[:, None]
    i = torch.arange(grid, dtype=torch.float64)[None, :] + 0.5
    pos = (start + p * bin_size + i * bin_size / grid).reshape(-1)
    valid = (pos >= -1.0) & (pos <= size)  # samples further out contribute 0
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    edge = low >= size - 1  # at or past the last pixel: both taps on it
    low = low.clamp(max=size - 1)
    high = torch.where(edge, low, low + 1)
    pos = torch.where(edge, low.double(), pos)
    frac = pos - low.double()
    return low, high, 1.0 - frac, frac, valid


def roi_align_reference(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float = 1.0,
                        sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign, one RoI at a time, in float64.

    Args:
        input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) (batch_idx, x1, y1, x2, y2): as roi_align.
        output_size (oh, ow), spatial_scale, sampling_ratio (<= 0: adaptive), aligned: as roi_align.
    Returns:
        Tensor[K, C, oh, ow] float64: the value the kernel approximates in its own dtype;
        differentiable wrt input (the gradient the kernel's backward approximates).
    """
    oh, ow = output_size
    _, c, h, w = input.shape
    x = input.double().cpu()
    out = torch.zeros(rois.shape[0], c, oh, ow, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, rx1, ry1, rx2, ry2) in enumerate(rois.double().cpu().tolist()):
        sx, sy = rx1 * spatial_scale - offset, ry1 * spatial_scale - offset
        rw, rh = rx2 * spatial_scale - offset - sx, ry2 * spatial_scale - offset - sy
        if not aligned:  # legacy: malformed RoIs become 1x1
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gy = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gx = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        if gy <= 0 or gx <= 0:  # an empty aligned RoI has no samples: its bins are 0
            continue
        ylo, yhi, wylo, wyhi, vy = _axis_samples(sy, rh, oh, gy, h)
        xlo, xhi, wxlo, wxhi, vx = _axis_samples(sx, rw, ow, gx, w)
        img = x[int(b)]  # (C, H, W)
        val = torch.zeros(c, ylo.numel(), xlo.numel(), dtype=torch.float64)
        for yy, wy in ((ylo, wylo), (yhi, wyhi)):
            for xx, wx in ((xlo, wxlo), (xhi, wxhi)):
                val += (wy[:, None] * wx[None, :]) * img[:, yy[:, None], xx[None, :]]
        val *= (vy[:, None] & vx[None, :])
        # (C, oh*gy, ow*gx) -> (C, oh, gy, ow, gx): a bin is the mean of its samples
        out[k] = val.view(c, oh, gy, ow, gx).sum((2, 4)) / (gy * gx)
    return out
