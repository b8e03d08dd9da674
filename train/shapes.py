"""`synthetic-shapes`: a deterministic, seeded detection dataset generated in memory.

Each image shows 0-4 filled shapes (circle, square, triangle, cross) on a varied background
(noisy flat colour, linear gradient, stripes or checkerboard). Image i of a split is a pure
function of (seed, split, i): no files, no cache, identical in every worker process.

Samples follow the dataset protocol of `train.data`: `(image: Tensor[3, h, w] uint8,
target: dict(boxes: Tensor[G, 4] float32 xyxy original pixels, labels: Tensor[G] int64 >= 1,
image_id: int))`; class 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
_SPLIT_CODES = {"train": 0, "val": 1}
_DEFAULT_SIZES = {"train": 512, "val": 128}


@dataclass(frozen=True)
class ShapeObject:
    label: int  # 1..len(SHAPE_NAMES)
    box: tuple[float, float, float, float]  # xyxy, pixels
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    background: int  # 0 noise, 1 gradient, 2 stripes, 3 checkerboard
    objects: tuple[ShapeObject, ...]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        self.split = split
        self.size = _DEFAULT_SIZES[split] if size is None else size
        self.seed = seed
        self.min_side, self.max_side = min_side, max_side
        self.object_size = object_size
        self.max_objects = max_objects
        self.class_names = ["__background__", *SHAPE_NAMES]
        # Labels are their own COCO category ids (1..K).
        self.label_to_category_id = list(range(len(self.class_names)))
        self._layouts = [self._layout(i) for i in range(self.size)]
        self.aspect_ratios = [lay.width / lay.height for lay in self._layouts]

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, stream])

    def _layout(self, index: int) -> Layout:
        rng = self._rng(index, 0)
        width = int(rng.integers(self.min_side, self.max_side + 1))
        height = int(rng.integers(self.min_side, self.max_side + 1))
        background = int(rng.integers(0, 4))
        n = 0 if rng.random() < 0.05 else int(rng.integers(1, self.max_objects + 1))
        objects: list[ShapeObject] = []
        lo, hi = self.object_size
        hi = min(hi, width - 2, height - 2)
        for _ in range(n):
            for _attempt in range(20):
                side = int(rng.integers(lo, hi + 1))
                x1 = int(rng.integers(0, width - side + 1))
                y1 = int(rng.integers(0, height - side + 1))
                box = (float(x1), float(y1), float(x1 + side), float(y1 + side))
                # Little overlap keeps every object visible enough to be a fair target.
                if all(_iou(box, o.box) < 0.1 for o in objects):
                    label = int(rng.integers(1, len(SHAPE_NAMES) + 1))
                    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
                    objects.append(ShapeObject(label, box, color))
                    break
        return Layout(width, height, background, tuple(objects))

    def _background(self, layout: Layout, rng: np.random.Generator) -> np.ndarray:
        h, w = layout.height, layout.width
        base = rng.uniform(40, 215, size=3)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        kind = layout.background
        if kind == 0:  # flat colour with noise
            img = np.broadcast_to(base, (h, w, 3)) + rng.normal(0, rng.uniform(5, 30), size=(h, w, 3))
        elif kind == 1:  # linear gradient between two colours at a random angle
            other = rng.uniform(40, 215, size=3)
            angle = rng.uniform(0, 2 * np.pi)
            t = xx * np.cos(angle) + yy * np.sin(angle)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
            img = base + t[..., None] * (other - base)
        else:  # stripes or checkerboard texture, low contrast
            period = rng.uniform(6, 30)
            amp = rng.uniform(15, 45)
            if kind == 2:
                angle = rng.uniform(0, np.pi)
                wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
            else:
                wave = np.sign(np.sin(xx * np.pi / period) * np.sin(yy * np.pi / period))
            img = base + amp * wave[..., None]
        return np.clip(img, 0, 255).astype(np.uint8)

    def render(self, index: int) -> np.ndarray:
        """Returns the image as HWC uint8 RGB."""
        layout = self._layouts[index]
        rng = self._rng(index, 1)
        canvas = self._background(layout, rng)
        bg_mean = canvas.reshape(-1, 3).mean(0)
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for obj in layout.objects:
            color = np.array(obj.color, dtype=np.float32)
            if np.abs(color - bg_mean).max() < 80:  # too close to the background: flip it
                color = 255 - color
            fill = tuple(int(c) for c in color)
            x1, y1, x2, y2 = obj.box
            s = x2 - x1
            # PIL fills pixel centres up to and including the last coordinate, hence the -1.
            if obj.label == 1:
                draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
            elif obj.label == 2:
                draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
            elif obj.label == 3:
                draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
            else:
                t = s / 3
                draw.rectangle([x1 + t, y1, x2 - 1 - t, y2 - 1], fill=fill)
                draw.rectangle([x1, y1 + t, x2 - 1, y2 - 1 - t], fill=fill)
        return np.asarray(pil)

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
