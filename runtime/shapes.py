"""The synthetic-shapes generator: seeded images of filled shapes and their boxes.

Each image shows 0-4 filled shapes (circle, square, triangle, cross) on a varied background
(noisy flat colour, linear gradient, stripes or checkerboard). Image `index` of a split is a pure
function of (seed, split, index, the size parameters): no files, no cache, the same everywhere.

It lives here, below train and server: train builds its `synthetic-shapes` dataset on it
(train/shapes.py) and the server draws its "try a sample" image with it (the demo model was
trained on these). numpy and PIL only.

Boxes are xyxy in pixels of the image; labels 1..len(SHAPE_NAMES); class 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
CLASS_NAMES = ("__background__", *SHAPE_NAMES)
SPLIT_CODES = {"train": 0, "val": 1}


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


@dataclass(frozen=True)
class ShapeParams:
    """Size parameters of a split: with (seed, split, index) they fix an image completely."""

    min_side: int = 128  # range of the image's sides in pixels
    max_side: int = 192
    object_size: tuple[int, int] = (20, 80)  # range of an object's side in pixels
    max_objects: int = 4  # at most this many objects; about 1 image in 20 has none


def rng_for(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Stream 0 draws the layout, stream 1 the pixels: a layout is known without rendering."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_layout(seed: int, split: str, index: int, params: ShapeParams = ShapeParams()) -> Layout:
    rng = rng_for(seed, split, index, 0)
    width = int(rng.integers(params.min_side, params.max_side + 1))
    height = int(rng.integers(params.min_side, params.max_side + 1))
    background = int(rng.integers(0, 4))
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, params.max_objects + 1))
    objects: list[ShapeObject] = []
    lo, hi = params.object_size
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


def _background(layout: Layout, rng: np.random.Generator) -> np.ndarray:
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


def render(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """The image of `layout` as (h, w, 3) uint8 RGB; `rng` draws the background."""
    canvas = _background(layout, rng)
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


def sample(seed: int, split: str, index: int, params: ShapeParams = ShapeParams()) -> tuple[np.ndarray, Layout]:
    """Image `index` of (seed, split): ((h, w, 3) uint8 RGB, its layout with the true boxes)."""
    layout = make_layout(seed, split, index, params)
    return render(layout, rng_for(seed, split, index, 1)), layout
