"""COCO box metrics through pycocotools.

`coco_metrics` is the one place that calls COCOeval; the file CLI (`python -m train evaluate`)
and the in-memory validation during training both go through it, so they agree by construction.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

# COCOeval.stats order (bbox): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100,
# AR small/medium/large.
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(gt: dict, detections: list[dict]) -> dict[str, float]:
    """Box AP/AR of COCO-format detections against a COCO-format ground truth.

    Args:
        gt: COCO json dict (images, annotations, categories).
        detections: list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.
    Returns:
        dict with METRIC_KEYS; pycocotools' -1 (no ground truth in an area range) is kept as is.
        Zeros everywhere when there are no detections (pycocotools cannot load an empty list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(METRIC_KEYS, 0.0)
    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    # pycocotools prints its progress and tables; keep our stdout for our own output.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(METRIC_KEYS, ev.stats, strict=True)}


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


def detections_to_coco(
    detections: list, image_ids: list[int], label_to_category_id: list[int]
) -> list[dict]:
    """Model detections (original-image pixels, xyxy, labels 1..K) -> COCO results (xywh, category ids).

    Args:
        detections: per image, an object with boxes: Tensor[n, 4], scores: Tensor[n], labels: Tensor[n].
    """
    results = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det.boxes.detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, det.scores.tolist(), det.labels.tolist(), strict=True):
            results.append({
                "image_id": int(image_id), "category_id": int(label_to_category_id[label]),
                "bbox": [round(v, 3) for v in box], "score": round(float(score), 5),
            })
    return results


@torch.no_grad()
def predict_dataset(net, cfg, dataset, *, batch_size: int = 4, num_workers: int = 0,
                    score_thresh: float = 0.05, progress: bool = False, device=None) -> list[dict]:
    """Run the detector over a dataset; returns COCO results (original pixels, category ids)."""
    from model.postprocess import postprocess
    from model.transform import preprocess
    from train.data import build_loader

    loader, _ = build_loader(dataset, batch_size=batch_size, seed=0, shuffle=False, num_workers=num_workers)
    was_training = net.training
    net.eval()
    results: list[dict] = []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    try:
        for images, targets in it:
            batch = preprocess(images, cfg.transform)
            dev = device if device is not None else batch.images.device
            raw = net(batch.images.to(dev), batch.image_sizes.to(dev))
            raw = type(raw)(*(t.cpu() for t in raw))
            dets = postprocess(raw, batch.image_sizes, batch.original_sizes, score_thresh=score_thresh)
            results += detections_to_coco(dets, [t["image_id"] for t in targets], dataset.label_to_category_id)
    finally:
        net.train(was_training)
    return results


def evaluate_model(net, cfg, dataset, **kwargs) -> dict[str, float]:
    """In-memory validation: detector over `dataset`, scored against `dataset.coco_gt()`."""
    return coco_metrics(dataset.coco_gt(), predict_dataset(net, cfg, dataset, **kwargs))
