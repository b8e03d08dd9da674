"""`synthetic-shapes`: the seeded detection dataset of runtime/shapes.py as a torch Dataset.

The generator (layouts, rendering) lives in runtime/shapes.py so the server can draw a sample
image without importing train; this module adds the dataset protocol of `train.data`:
`(image: Tensor[3, h, w] uint8, target: dict(boxes: Tensor[G, 4] float32 xyxy original pixels,
labels: Tensor[G] int64 >= 1, image_id: int))`; class 0 is background.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.shapes import (  # noqa: F401  (re-exported: the generator's names, as before the move)
    CLASS_NAMES,
    SHAPE_NAMES,
    Layout,
    ShapeObject,
    ShapeParams,
    make_layout,
    render,
    rng_for,
)

_DEFAULT_SIZES = {"train": 512, "val": 128}


class SyntheticShapes(torch.utils.data.Dataset):
    """Seeded shapes on textured backgrounds.

    Args:
        split: "train" or "val"; the splits use disjoint random streams.
        size: number of images (default 512 train, 128 val).
        seed: dataset seed; (seed, split, index) fixes an image completely.
        min_side, max_side: range of the image's sides in pixels.
        object_size: range of an object's side in pixels.
        max_objects: at most this many objects per image; about 1 image in 20 has none.
    """

    def __init__(
        self,
        *,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        min_side: int = 128,
        max_side: int = 192,
        object_size: tuple[int, int] = (20, 80),
        max_objects: int = 4,
    ):
        if split not in _DEFAULT_SIZES:
            raise ValueError(f"split must be one of {sorted(_DEFAULT_SIZES)}, got {split!r}")
        self.split = split
        self.size = _DEFAULT_SIZES[split] if size is None else size
        self.seed = seed
        self.params = ShapeParams(min_side, max_side, tuple(object_size), max_objects)
        self.class_names = list(CLASS_NAMES)
        # Labels are their own COCO category ids (1..K).
        self.label_to_category_id = list(range(len(self.class_names)))
        self._layouts = [make_layout(seed, split, i, self.params) for i in range(self.size)]
        self.aspect_ratios = [lay.width / lay.height for lay in self._layouts]

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> np.ndarray:
        """Returns the image as HWC uint8 RGB."""
        return render(self._layouts[index], rng_for(self.seed, self.split, index, 1))

    def target(self, index: int) -> dict:
        objects = self._layouts[index].objects
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([o.label for o in objects], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": index}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = torch.from_numpy(self.render(index).copy()).permute(2, 0, 1)  # HWC -> (3, h, w)
        return image.contiguous(), self.target(index)

    def coco_gt(self) -> dict:
        """Ground truth as a COCO json dict (for pycocotools)."""
        images, annotations = [], []
        for i, layout in enumerate(self._layouts):
            images.append({"id": i, "width": layout.width, "height": layout.height, "file_name": f"{i}.png"})
            for obj in layout.objects:
                x1, y1, x2, y2 = obj.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i, "category_id": obj.label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                })
        categories = [{"id": i, "name": n} for i, n in enumerate(self.class_names) if i > 0]
        return {"images": images, "annotations": annotations, "categories": categories}
