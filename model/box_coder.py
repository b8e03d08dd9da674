"""Box <-> regression-target coding of R-CNN: (dx, dy, dw, dh) relative to a reference box.

encode: t = (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * log(gw / aw), wh * log(gh / ah)) with
centres (x, y) and sizes (w, h); decode inverts it, clamping dw, dh so exp() cannot overflow.
"""

from __future__ import annotations

import math

import torch

# clamp: a 16 px anchor can grow to at most 1000 px, and exp() stays finite.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float], clip: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, ref: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """ref, gt: Tensor[N, 4] xyxy -> Tensor[N, 4] targets."""
        wx, wy, ww, wh = self.weights
        ref_w = ref[:, 2] - ref[:, 0]
        ref_h = ref[:, 3] - ref[:, 1]
        ref_x = ref[:, 0] + 0.5 * ref_w
        ref_y = ref[:, 1] + 0.5 * ref_h
        gt_w = gt[:, 2] - gt[:, 0]
        gt_h = gt[:, 3] - gt[:, 1]
        gt_x = gt[:, 0] + 0.5 * gt_w
        gt_y = gt[:, 1] + 0.5 * gt_h
        return torch.stack([wx * (gt_x - ref_x) / ref_w, wy * (gt_y - ref_y) / ref_h,
                            ww * torch.log(gt_w / ref_w), wh * torch.log(gt_h / ref_h)], dim=1)

    def decode(self, codes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """codes: Tensor[N, K*4] (K boxes per reference, e.g. one per class); ref: Tensor[N, 4].
        Returns Tensor[N, K, 4] xyxy."""
        ref = ref.to(codes.dtype)
        wx, wy, ww, wh = self.weights
        widths = ref[:, 2] - ref[:, 0]
        heights = ref[:, 3] - ref[:, 1]
        ctr_x = ref[:, 0] + 0.5 * widths
        ctr_y = ref[:, 1] + 0.5 * heights
        codes = codes.reshape(codes.shape[0], codes.shape[1] // 4, 4)  # (N, K*4) -> (N, K, 4); N may be 0
        dx = codes[..., 0] / wx
        dy = codes[..., 1] / wy
        dw = torch.clamp(codes[..., 2] / ww, max=self.clip)
        dh = torch.clamp(codes[..., 3] / wh, max=self.clip)
        pred_x = dx * widths[:, None] + ctr_x[:, None]
        pred_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h], dim=-1)
