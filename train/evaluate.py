"""Evaluation of a detector on a dataset: runtime.Pipeline for detections, runtime.coco for metrics.

Validation during training and `python -m train evaluate` both score through `runtime.coco.coco_metrics`,
and detections come from the same Pipeline the server runs, so every threshold of the model config
(`roi_heads.score_thresh`, `nms_thresh`, `min_size`, `detections_per_img`) applies here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.coco import coco_metrics, detections_to_coco
from runtime.pipeline import Pipeline, same_size_batches


def evaluate_files(annotations: str | Path, detections: str | Path, out: str | Path | None = None) -> dict:
    """`python -m train evaluate`: metrics of a detections json (COCO results format)."""
    with open(annotations) as f:
        gt = json.load(f)
    with open(detections) as f:
        dets = json.load(f)
    metrics = coco_metrics(gt, dets)
    if out is not None:
        Path(out).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def predict_dataset(net, cfg, dataset, *, batch_size: int = 4, progress: bool = False) -> list[dict]:
    """Run the detector over a dataset through runtime.Pipeline; returns COCO results (original
    pixels, category ids). Images are batched only with images of the same padded size."""
    pipe = Pipeline.from_model(net, cfg, dataset.class_names)
    results: list[dict] = []
    chunk = max(batch_size, 1) * 8  # images prepared at once: bounds memory, still groups sizes
    starts = range(0, len(dataset), chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="eval", leave=False, dynamic_ncols=True)
    for s in starts:
        items = [dataset[i] for i in range(s, min(s + chunk, len(dataset)))]
        prepared = [pipe.prepare(image) for image, _ in items]
        for idx in same_size_batches([pipe.padded_size(p) for p in prepared], batch_size):
            dets = pipe.run([prepared[i] for i in idx])
            ids = [items[i][1]["image_id"] for i in idx]
            results += detections_to_coco(dets, ids, dataset.label_to_category_id)
    return results


def evaluate_model(net, cfg, dataset, **kwargs) -> dict[str, float]:
    """In-memory validation: detector over `dataset`, scored against `dataset.coco_gt()`."""
    return coco_metrics(dataset.coco_gt(), predict_dataset(net, cfg, dataset, **kwargs))
