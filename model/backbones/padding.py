"""Padding masks: zero every feature map outside each image's own region.

In a padded batch, conv features near an image's bottom/right edge see the batch's padding (whose
activations are not zero after a conv's bias and norm), so a batched image's detections differ
from the same image alone. Zeroing each map outside ceil(image size / stride) after every conv
block makes the padding look the same however much of it there is: batched == one-by-one.
torchvision does not do this, so it is an option (BackboneConfig.pad_invariant), on for `tiny`.
"""

from __future__ import annotations

import torch


class PaddingMask:
    """Multiplies (B, C, h, w) maps by their batch's validity mask, one mask per map size.

    image_sizes: (B, 2) int64 (h, w) of each image inside the padded batch of size batch_hw.
    """

    def __init__(self, image_sizes: torch.Tensor, batch_hw: tuple[int, int]):
        self.image_sizes = image_sizes
        self.batch_hw = batch_hw
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, h, w) 1 inside each image's region at this map's stride, 0 outside."""
        key = (h, w)
        if key not in self._masks:
            stride_h, stride_w = self.batch_hw[0] // h, self.batch_hw[1] // w
            sizes = self.image_sizes
            valid_h = torch.div(sizes[:, 0] + stride_h - 1, stride_h, rounding_mode="floor")  # (B,)
            valid_w = torch.div(sizes[:, 1] + stride_w - 1, stride_w, rounding_mode="floor")
            rows = torch.arange(h, device=sizes.device)[None, :] < valid_h[:, None]  # (B, h)
            cols = torch.arange(w, device=sizes.device)[None, :] < valid_w[:, None]  # (B, w)
            self._masks[key] = (rows[:, :, None] & cols[:, None, :])[:, None]
        return self._masks[key].to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask(x.shape[-2], x.shape[-1], x.dtype)


def anchors_inside(anchors: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """(N, 4) anchors, (B, 2) sizes -> (B, N) bool: the anchor's centre lies inside the image.

    With masked features, anchors centred in the padding see only zeros; dropping them keeps an
    image's candidate proposals the same in any batch."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    sizes = image_sizes.to(anchors.dtype)
    return (cx[None, :] < sizes[:, 1:2]) & (cy[None, :] < sizes[:, 0:1])
