"""model.postprocess in numpy, for the few dozen to few hundred candidates a served image has: the
same detections to the bit, without a torch op per step.

Shape shorthand: R RoIs of the batch, C classes (0 = background), N candidates of one image (class
scores above its threshold), K kept. Boxes are xyxy in absolute pixels.

Why: on a server request the torch path is about forty small tensor ops (filter, small boxes,
class-wise NMS in tiles, rescale), and their dispatch is most of its time: 0.67-0.80 ms for the
demo model's 20-50 candidates, against about 0.1 ms here (see the README's serving section).

Why it equals model.postprocess to the bit: every value is the same float32 operation in the same
order (IoU as model.ops.nms._pair_iou: inter / ((area_a + area_b) - inter); thresholds as float32,
the NMS threshold as model.ops.nms._threshold_below gives it), NMS is the same greedy rule (visit by
decreasing score, stable for ties; drop a box whose IoU with a kept box of its class is above the
threshold) on the full (N, N) suppression matrix instead of tiles, and the outputs are gathered in
the same order. tests/runtime/test_fast_post.py compares the two on seeded inputs built to tie and
to sit on every threshold, and on a real model's outputs.

Where it does not apply, `postprocess` returns None and the caller takes model.postprocess: tensors
not float32 or not on the CPU, non-finite values, or an image with more than MAX_CANDIDATES
candidates (the (N, N) matrix and the greedy loop grow as N^2; the torch path's tiles do not).
"""

from __future__ import annotations

import numpy as np
import torch

from model.ops.nms import _threshold_below
from model.postprocess import Detections, RawDetections

__all__ = ["MAX_CANDIDATES", "postprocess"]

MAX_CANDIDATES = 256  # per image; past it the torch path


def postprocess(raw: RawDetections, image_sizes: torch.Tensor, original_sizes: torch.Tensor, *,
                score_thresh: list[float], nms_thresh: float, detections_per_img: list[int], min_size: float,
                classes: list[torch.Tensor | None]) -> list[Detections] | None:
    """model.postprocess's result for the same arguments (per-image lists, one entry per image), or
    None where this path does not apply (see the module)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (raw.scores, raw.boxes)):
        return None
    scores = raw.scores.detach().numpy()  # (R, C)
    boxes = raw.boxes.detach().numpy()  # (R, C, 4)
    B = int(image_sizes.shape[0])
    C = scores.shape[1]
    thr = _threshold_below(float(nms_thresh), torch.float32)
    batch_idx = raw.batch_idx.numpy() if B > 1 else None
    sizes = image_sizes.numpy().astype(np.float32)  # (B, 2) (h, w): exact for any image size
    originals = original_sizes.numpy().astype(np.float32)
    out = []
    for i in range(B):
        rows = slice(None) if B == 1 else np.flatnonzero(batch_idx == i)
        s = scores[rows, 1:].reshape(-1)  # (R_i * (C-1),) row-major: index r * (C-1) + (c-1)
        keep = np.flatnonzero(s > np.float32(score_thresh[i]))
        labels = keep % max(1, C - 1) + 1
        if classes[i] is not None:
            wanted = np.isin(labels, classes[i].numpy())
            keep, labels = keep[wanted], labels[wanted]
        if keep.size > MAX_CANDIDATES:
            return None
        s = s[keep]
        b = boxes[rows, 1:].reshape(-1, 4)[keep]  # (N, 4)
        if not (np.isfinite(s).all() and np.isfinite(b).all()):
            return None  # NaN orders and compares as torch's sort may not: its path decides
        small = (b[:, 2] - b[:, 0] >= np.float32(min_size)) & (b[:, 3] - b[:, 1] >= np.float32(min_size))
        keep = np.flatnonzero(small)
        s, b, labels = s[keep], b[keep], labels[keep]
        keep = _class_nms(b, s, labels, thr)[: detections_per_img[i]]
        h, w = originals[i] / sizes[i]  # float32 ratios, as model.transform.scale_boxes
        scale = np.array([w, h, w, h], dtype=np.float32)
        out.append(Detections(torch.from_numpy(b[keep] * scale), torch.from_numpy(s[keep]),
                              torch.from_numpy(labels[keep].astype(np.int64))))
    return out


def _class_nms(b: np.ndarray, s: np.ndarray, labels: np.ndarray, thr: float) -> np.ndarray:
    """b (N, 4) float32, s (N,), labels (N,) -> (K,) int64 indices kept, by decreasing score:
    greedy NMS within each class, IoU > thr suppresses (thr: a float32 value)."""
    n = s.shape[0]
    if n == 0:
        return np.empty(0, np.int64)
    order = np.argsort(-s, kind="stable")  # decreasing, ties in index order (torch.sort stable)
    x1, y1, x2, y2 = b[order].T
    area = (x2 - x1) * (y2 - y1)
    w = np.maximum(np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :]), np.float32(0))
    h = np.maximum(np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :]), np.float32(0))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 for empty boxes: NaN, never above thr, as in torch
        iou = inter / ((area[:, None] + area[None, :]) - inter)  # (N, N)
    lab = labels[order]
    sup = (iou > np.float32(thr)) & (lab[:, None] == lab[None, :])
    dead = np.zeros(n, dtype=bool)
    kept = []
    for j in range(n):  # rows of kept boxes only; each row a vector op
        if not dead[j]:
            kept.append(j)
            dead |= sup[j]
    return order[np.asarray(kept, dtype=np.int64)]
