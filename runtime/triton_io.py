"""The client's side of a Triton model repository written by `python -m export triton`.

Triton runs the graph only: it does not decode, resize or normalise images. These functions are
that step, with the same code as our server (model.transform), so a Triton client gets the
detections `python -m server` gives:

    meta = read_repository_metadata("out/triton/frcnn")                 # its frcnn.json
    inputs, original_sizes = triton_inputs(images, meta.input_settings)  # images: list of (h, w, 3) uint8 RGB
    # -> client.infer("frcnn", ...) with inputs["images"] FP32 [B, 3, H, W], inputs["image_sizes"] INT64 [B, 2]
    dets = triton_detections(outputs, inputs["image_sizes"], original_sizes)  # outputs: name -> np.ndarray

Padding decides what batches. Triton's dynamic batcher stacks only requests of equal shape, and an
image's answer is exactly its one-image answer only at its own padded size (DESIGN: batch only
images of the same padded size). So, as our server does: send images of one padded size per request
(runtime.pipeline.same_size_batches groups them; a camera's frames all share one) and Triton merges
the concurrent requests of each size. `size=common_size(...)` pads every image to one square instead,
so that every request can be stacked with any other, at a cost measured on the tiny preset: extra
padding moved one of 90 detections over three COCO photos (a box on the right border, score 0.245
instead of 0.250, 0.09 px).

Shape shorthand: B images, H, W the padded size, K detections per image (the graph's max_detections).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import TransformConfig
from model.transform import normalize_resize, pad_batch
from runtime.contract import GraphMetadata


def read_repository_metadata(model_dir: str | Path) -> GraphMetadata:
    """REPO/NAME/frcnn.json (written beside config.pbtxt) -> the graph's metadata."""
    return GraphMetadata.from_props(json.loads((Path(model_dir) / "frcnn.json").read_text()))


def common_size(input_settings: dict[str, Any]) -> int:
    """S: the padded side that holds every resized image (longer side <= max_size)."""
    t = TransformConfig(**_transform_fields(input_settings))
    extra = 1 if t.pad_past_edge else 0
    return int(math.ceil((int(t.max_size) + extra) / t.size_divisible) * t.size_divisible)


def triton_inputs(images: list[np.ndarray], input_settings: dict[str, Any], *, size: int | None = None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """[(h, w, 3) uint8 RGB] -> ({"images": float32 (B, 3, H, W), "image_sizes": int64 (B, 2)},
    original sizes int64 (B, 2) as (h, w)). H, W: the padded size of the batch, as our server pads
    it (model.transform.pad_batch), or size x size when given (see common_size)."""
    t = TransformConfig(**_transform_fields(input_settings))
    resized, originals = [], np.zeros((len(images), 2), np.int64)
    with torch.inference_mode():
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected (h, w, 3) uint8 RGB, got {image.shape} {image.dtype}")
            resized.append(normalize_resize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), t))
            originals[i] = image.shape[:2]
        batch, sizes = pad_batch(resized, t.size_divisible, t.pad_past_edge)  # (B, 3, H, W), (B, 2)
    if size is not None:
        if max(batch.shape[2:]) > size:
            raise ValueError(f"padded size {tuple(batch.shape[2:])} does not fit in {size} x {size}")
        batch = torch.nn.functional.pad(batch, (0, size - batch.shape[3], 0, size - batch.shape[2]))
    return {"images": batch.numpy(), "image_sizes": sizes.numpy()}, originals


def triton_detections(outputs: dict[str, np.ndarray], image_sizes: np.ndarray, original_sizes: np.ndarray
                      ) -> list[dict[str, np.ndarray]]:
    """The --with-nms graph's outputs (boxes [B, K, 4] in resized-image pixels, scores, labels [B, K],
    num_detections [B]) -> per image {"boxes": (n, 4) float32 xyxy original pixels, "scores": (n,),
    "labels": (n,) int64}, the padding rows dropped."""
    out = []
    for i, n in enumerate(np.asarray(outputs["num_detections"]).reshape(-1).tolist()):
        ratio_h, ratio_w = (np.asarray(original_sizes[i], np.float32) / np.asarray(image_sizes[i], np.float32))
        boxes = np.asarray(outputs["boxes"][i, :n], np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h],
                                                                           np.float32)
        out.append({"boxes": boxes, "scores": np.asarray(outputs["scores"][i, :n], np.float32),
                    "labels": np.asarray(outputs["labels"][i, :n], np.int64)})
    return out


def _transform_fields(settings: dict[str, Any]) -> dict[str, Any]:
    fields = TransformConfig.__dataclass_fields__
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in fields}
