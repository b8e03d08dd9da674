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
    """Multiplies (B, C, h, w) maps of a given stride by their batch's validity mask.

    image_sizes: (B, 2) int64 (h, w) of each image inside the padded batch. One mask per stride
    (a Python int, known from the architecture), computed once per forward.
    """

    def __init__(self, image_sizes: torch.Tensor):
        self.image_sizes = image_sizes
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, stride: int, h: int, w: int) -> torch.Tensor:
        """(B, 1, h, w) bool: inside each image's region, ceil(size / stride), at this stride."""
        if stride not in self._masks:
            sizes = self.image_sizes
            valid = torch.div(sizes + stride - 1, stride, rounding_mode="floor")  # (B, 2)
            rows = torch.arange(h, device=sizes.device)[None, :] < valid[:, 0:1]  # (B, h)
            cols = torch.arange(w, device=sizes.device)[None, :] < valid[:, 1:2]  # (B, w)
            self._masks[stride] = (rows[:, :, None] & cols[:, None, :])[:, None]
        return self._masks[stride]

    def __call__(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        return x * self.mask(stride, x.shape[-2], x.shape[-1]).to(x.dtype)


def anchors_inside(anchors: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """(N, 4) anchors, (B, 2) sizes -> (B, N) bool: the anchor's centre lies inside the image.

    With masked features, anchors centred in the padding see only zeros; dropping them keeps an
    image's candidate proposals the same in any batch."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    sizes = image_sizes.to(anchors.dtype)
    return (cx[None, :] < sizes[:, 1:2]) & (cy[None, :] < sizes[:, 0:1])
