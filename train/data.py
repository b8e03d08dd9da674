"""Dataset selection, collate and DataLoader construction.

Dataset protocol (CocoDetection, SyntheticShapes): `len`, `ds[i] -> (Tensor[3, h, w] uint8,
dict(boxes: Tensor[G, 4] float32 xyxy ORIGINAL pixels, labels: Tensor[G] int64 >= 1,
image_id: int))`, plus `class_names` (0 = "__background__"), `label_to_category_id`,
`aspect_ratios` (w / h, known without decoding) and `coco_gt()` (a COCO json dict).
Boxes stay in original pixels here; the loop maps them to resized pixels after preprocess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from train.coco import CocoDetection
from train.sampler import GroupedBatchSampler
from train.shapes import SyntheticShapes

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic-shapes"


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from: `source` is "synthetic-shapes" or a COCO-style folder
    (annotations/instances_<split>.json and <split>/ images); explicit paths override."""

    source: str
    train_annotations: str | None = None
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    synthetic_train_size: int | None = None
    synthetic_val_size: int | None = None
    synthetic_seed: int = 0


def _find_coco_split(root: Path, preferred: tuple[str, ...]) -> tuple[Path, Path] | None:
    for split in preferred:
        ann = root / "annotations" / f"instances_{split}.json"
        if ann.exists() and (root / split).is_dir():
            return ann, root / split
    return None


def build_datasets(spec: DataSpec):
    """Returns (train_dataset, val_dataset)."""
    if spec.source == SYNTHETIC:
        train = SyntheticShapes(split="train", size=spec.synthetic_train_size, seed=spec.synthetic_seed)
        val = SyntheticShapes(split="val", size=spec.synthetic_val_size, seed=spec.synthetic_seed)
        return train, val
    root = Path(spec.source)
    if root.suffix == ".json":  # --data GT.json --images DIR
        if not spec.train_images:
            raise ValueError(f"--data {root} is an annotation file: give its image folder with --images DIR")
        train_paths = (root, Path(spec.train_images))
    else:
        train_paths = (
            (Path(spec.train_annotations), Path(spec.train_images)) if spec.train_annotations and spec.train_images
            else _find_coco_split(root, ("train2017", "train2014", "train"))
        )
    if train_paths is None:
        raise FileNotFoundError(f"{root}: no annotations/instances_<train split>.json with its image folder; "
                                "pass --train-annotations and --train-images")
    val_images = spec.val_images or (str(train_paths[1]) if spec.val_annotations else None)
    val_paths = (
        (Path(spec.val_annotations), Path(val_images)) if spec.val_annotations and val_images
        else _find_coco_split(root, ("val2017", "val2014", "val"))
    )
    if val_paths is None:
        log.warning("%s: no validation split found; validating on the training images", root)
        val_paths = train_paths
    train = CocoDetection(annotations=train_paths[0], images_dir=train_paths[1])
    val = CocoDetection(annotations=val_paths[0], images_dir=val_paths[1])
    if train.class_names != val.class_names:
        raise ValueError("train and val annotation files list different categories")
    return train, val


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keeps images as a list (sizes differ); the model's preprocess resizes and pads."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def build_loader(
    dataset, *, batch_size: int, seed: int, shuffle: bool, num_workers: int, rank: int = 0,
    world_size: int = 1, drop_last: bool = False,
) -> tuple[torch.utils.data.DataLoader, GroupedBatchSampler]:
    sampler = GroupedBatchSampler(dataset.aspect_ratios, batch_size, seed=seed, shuffle=shuffle,
                                  drop_last=drop_last, rank=rank, world_size=world_size)
    # Its own generator: creating an iterator would otherwise draw from the global RNG, and a
    # resumed run creates its iterator at another point of the RNG stream than the original did.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def resize_targets(targets: list[dict], image_sizes: torch.Tensor, original_sizes: torch.Tensor) -> list[dict]:
    """Map boxes from original to resized-image pixels (what the losses need).

    Args:
        image_sizes, original_sizes: Tensor[B, 2] int64 (h, w), from preprocess.
    Returns:
        targets with `boxes` (Tensor[G, 4] float32) scaled per axis by the same ratios that
        postprocess uses the other way, and `labels` kept.
    """
    from model.transform import scale_boxes

    return [
        {"boxes": scale_boxes(t["boxes"].float(), orig, size), "labels": t["labels"]}
        for t, size, orig in zip(targets, image_sizes, original_sizes, strict=True)
    ]
