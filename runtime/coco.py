"""COCO conversion and metrics, the one home: model detections -> COCO results, COCOeval.

Neutral ground below train and export (both use it; neither imports the other). `coco_metrics` is
the one place that calls pycocotools' COCOeval.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

# COCOeval.stats order (bbox): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100,
# AR small/medium/large.
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(gt: dict, detections: list[dict]) -> dict[str, float]:
    """Box AP/AR (fractions 0..1) of COCO-format detections against a COCO-format ground truth.

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


def detections_to_coco(detections: Sequence, image_ids: Sequence[int], label_to_category_id: Sequence[int]
                       ) -> list[dict]:
    """Model detections (original-image pixels, xyxy, labels 1..K) -> COCO results (xywh, category ids).

    Args:
        detections: per image, an object with boxes: Tensor[n, 4], scores: Tensor[n], labels: Tensor[n].
        label_to_category_id: index = label id, value = the COCO category id.
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


def label_to_category(gt: dict, class_names: Sequence[str]) -> list[int]:
    """Label id -> category id of `gt`, matched by class name (a name gt lacks maps to the label itself)."""
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    return [by_name.get(n, i) for i, n in enumerate(class_names)]


def subset(gt: dict, image_ids: Sequence[int]) -> dict:
    """`gt` restricted to `image_ids` (images and their annotations; categories kept)."""
    ids = set(image_ids)
    return {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}


def box_ap(dets: Sequence, image_ids: Sequence[int], gt: dict, class_names: Sequence[str]) -> float:
    """COCO box AP in percent of detections on images `image_ids` of the COCO json `gt`."""
    results = detections_to_coco(dets, image_ids, label_to_category(gt, class_names))
    return 100.0 * coco_metrics(subset(gt, image_ids), results)["AP"]
