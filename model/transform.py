"""Preprocessing: normalize, resize (shorter side to min_size unless the longer would pass max_size),
pad the batch to a multiple of size_divisible. Numerics follow torchvision's GeneralizedRCNNTransform.

Shape shorthand: B images, h, w an original image, H, W the padded batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.config import TransformConfig


class ImageBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float32, normalized, zero-padded
    image_sizes: torch.Tensor  # (B, 2) int64: resized (h, w) of each image inside the padding
    original_sizes: torch.Tensor  # (B, 2) int64: (h, w) before resizing


def resized_size(h: int, w: int, min_size: float, max_size: float) -> tuple[int, int]:
    """The (h, w) an image is resized to; scale = min(min_size / short side, max_size / long side),
    in float64 with the sizes floored, as torchvision's eager transform does."""
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    # max(1, ...): a 1 x 5000 px strip must not vanish (torchvision would fail on it)
    return max(1, int(math.floor(h * scale))), max(1, int(math.floor(w * scale)))


def to_float(image: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8 0..255 or float 0..1 -> float32 0..1."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, h, w), got {tuple(image.shape)}")
    # contiguous: a (3, h, w) view of an (h, w, 3) array keeps its channels-last strides through
    # .float(), and every later pass (normalize, interpolate) then runs 3x slower on it; one
    # uint8 copy to planar order first is cheaper (same values: layout only)
    if image.dtype == torch.uint8:
        return image.contiguous().float().div_(255)
    return image.float().contiguous()


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(3, h, w) uint8 or float 0..1 -> (3, h, w) float32 (x - mean) / std, per channel."""
    x = to_float(image)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    if image.dtype == torch.uint8:  # x is our own float copy: normalize it in place, no more full-size ones
        return x.sub_(m).div_(s)
    return (x - m) / s


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) float -> (3, h', w') = size, bilinear, align_corners=False (torchvision's).

    Each channel goes through as its own one-channel image, (3, 1, h, w): torch's CPU kernel takes
    another route for a three-channel image at one intra-op thread (a separable pass whose
    roundings differ from the usual route's in about half the pixels), so (1, 3, h, w) would make
    the answers depend on the thread count. One channel takes the usual route at every count (the
    one torchvision takes on two or more threads), and at one thread it is also 3x faster (4.6
    against 14.1 ms for 480x640 -> 600x800). Every value is the same formula either way."""
    return F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize_resize(image: torch.Tensor, cfg: TransformConfig, min_size: int | None = None) -> torch.Tensor:
    """(3, h, w) uint8 or float 0..1 -> (3, h', w') normalized, resized with bilinear, align_corners=False."""
    x = normalize(image, cfg.image_mean, cfg.image_std)
    size = resized_size(x.shape[1], x.shape[2], cfg.min_size if min_size is None else min_size, cfg.max_size)
    return resize(x, size)


def pad_batch(images: list[torch.Tensor], size_divisible: int, pad_past_edge: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[(3, h_i, w_i)] -> (B, 3, H, W) zero-padded at bottom/right with H, W multiples of size_divisible,
    and the (B, 2) int64 sizes. pad_past_edge: at least one padded pixel below and right of every
    image, so that RoIAlign at an image's edge always interpolates with padding, alone or batched."""
    extra = 1 if pad_past_edge else 0
    H = max(im.shape[1] for im in images) + extra
    W = max(im.shape[2] for im in images) + extra
    H = int(math.ceil(H / size_divisible) * size_divisible)
    W = int(math.ceil(W / size_divisible) * size_divisible)
    out = images[0].new_zeros((len(images), 3, H, W))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
    return out, sizes


def preprocess(images: list[torch.Tensor], cfg: TransformConfig, min_size: int | None = None) -> ImageBatch:
    """[(3, h, w) uint8 or float 0..1] -> ImageBatch. min_size overrides cfg.min_size (scale jitter)."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    resized = [normalize_resize(im, cfg, min_size) for im in images]
    batch, sizes = pad_batch(resized, cfg.size_divisible, cfg.pad_past_edge)
    original = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
    return ImageBatch(batch, sizes, original)


def scale_boxes(boxes: torch.Tensor, from_hw: torch.Tensor, to_hw: torch.Tensor) -> torch.Tensor:
    """boxes (..., 4) xyxy in an image of size from_hw (2,) -> the same boxes in an image of size to_hw."""
    ratio = to_hw.to(torch.float32) / from_hw.to(torch.float32)  # (h ratio, w ratio)
    return boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]]).to(boxes.dtype)
