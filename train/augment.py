"""Training augmentations applied to a collated batch in the main process.

They draw from a generator seeded by (seed, epoch, iteration), never from worker RNG, so a
resumed run repeats exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import torch


def batch_generator(seed: int, epoch: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + iteration)


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image and its boxes left-right.

    Args:
        image: Tensor[3, h, w].
        boxes: Tensor[G, 4] xyxy pixels of that image.
    """
    w = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.flip(-1), flipped


def random_hflip(
    images: list[torch.Tensor], targets: list[dict], generator: torch.Generator, p: float = 0.5
) -> tuple[list[torch.Tensor], list[dict]]:
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        if p > 0 and torch.rand((), generator=generator).item() < p:
            image, boxes = hflip(image, target["boxes"])
            target = {**target, "boxes": boxes}
        out_images.append(image)
        out_targets.append(target)
    return out_images, out_targets


def pick_min_size(choices: tuple[int, ...], generator: torch.Generator) -> int:
    """Scale jitter: one shorter-side target per batch, uniformly from `choices`."""
    return choices[int(torch.randint(len(choices), (), generator=generator).item())]
