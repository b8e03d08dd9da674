"""COCO json + image folder detection dataset.

Categories are sorted by COCO id and mapped to contiguous labels 1..K (0 is background).
Crowd boxes are left out of the training targets (pycocotools still sees them, through the
original json, as "ignore" regions when evaluating). Images without boxes stay in as negatives.
Boxes with no area after clipping to the image are dropped and counted in `num_degenerate`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """Samples `(image: Tensor[3, h, w] uint8, target: dict(boxes: Tensor[G, 4] float32 xyxy original
    pixels, labels: Tensor[G] int64 in 1..K, image_id: int))`.

    Args:
        images_dir: folder holding the `file_name`s of the json.
        annotations: path to a COCO instances json.
    """

    def __init__(self, *, images_dir: str | Path, annotations: str | Path):
        self.images_dir = Path(images_dir)
        self.annotations_path = Path(annotations)
        with open(self.annotations_path) as f:
            self._coco = json.load(f)
        cats = sorted(self._coco["categories"], key=lambda c: c["id"])
        self.class_names = ["__background__", *(c["name"] for c in cats)]
        self.label_to_category_id = [0, *(c["id"] for c in cats)]
        cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}

        self._images = sorted(self._coco["images"], key=lambda im: im["id"])
        by_image: dict[int, list[dict]] = {im["id"]: [] for im in self._images}
        for ann in self._coco["annotations"]:
            if ann["image_id"] in by_image:
                by_image[ann["image_id"]].append(ann)

        self.num_crowd = 0
        self.num_degenerate = 0
        self._targets = []
        for im in self._images:
            boxes, labels = [], []
            for ann in by_image[im["id"]]:
                if ann.get("iscrowd", 0):
                    self.num_crowd += 1
                    continue
                x, y, w, h = ann["bbox"]
                x1, y1 = max(0.0, x), max(0.0, y)
                x2, y2 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
                if x2 <= x1 or y2 <= y1:
                    self.num_degenerate += 1
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(cat_to_label[ann["category_id"]])
            self._targets.append((
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64),
            ))
        self.aspect_ratios = [im["width"] / im["height"] for im in self._images]
        if self.num_degenerate:
            log.warning("%s: dropped %d degenerate boxes (no area inside the image)",
                        self.annotations_path, self.num_degenerate)
        log.info("%s: %d images, %d categories, %d crowd boxes ignored", self.annotations_path,
                 len(self._images), len(cats), self.num_crowd)

    def __len__(self) -> int:
        return len(self._images)

    def target(self, index: int) -> dict:
        boxes, labels = self._targets[index]
        return {"boxes": boxes.clone(), "labels": labels.clone(), "image_id": self._images[index]["id"]}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        info = self._images[index]
        # No EXIF transpose: COCO annotations refer to the stored pixel grid.
        with Image.open(self.images_dir / info["file_name"]) as pil:
            array = np.asarray(pil.convert("RGB"))
        if array.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{info['file_name']}: image is {array.shape[1]}x{array.shape[0]}, "
                             f"json says {info['width']}x{info['height']}")
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # HWC -> (3, h, w)
        return image, self.target(index)

    def coco_gt(self) -> dict:
        """The ground truth json restricted to this dataset's images (crowd boxes included)."""
        ids = {im["id"] for im in self._images}
        return {
            "images": self._images,
            "annotations": [a for a in self._coco["annotations"] if a["image_id"] in ids],
            "categories": self._coco["categories"],
        }
