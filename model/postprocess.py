"""Detections from raw per-RoI outputs: class-wise NMS, score filter, top-k, boxes back to the
original images. Shared by evaluation, export verification, the runtime and the server.

Shape shorthand: R RoIs of the batch, C classes (0 = background), n detections of one image.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from model.ops.eager import batched_nms, remove_small_boxes  # no op dispatch: eager, our own tensors
from model.transform import scale_boxes


class RawDetections(NamedTuple):
    batch_idx: torch.Tensor  # (R,) int64: image of each RoI
    scores: torch.Tensor  # (R, C) softmax class probabilities
    boxes: torch.Tensor  # (R, C, 4) class-specific boxes, xyxy in resized-image pixels, clipped


class Detections(NamedTuple):
    boxes: torch.Tensor  # (n, 4) xyxy, original-image pixels
    scores: torch.Tensor  # (n,)
    labels: torch.Tensor  # (n,) int64 class ids >= 1


def postprocess(raw: RawDetections, image_sizes: torch.Tensor, original_sizes: torch.Tensor, *,
                score_thresh: float | list[float] = 0.05, nms_thresh: float = 0.5,
                detections_per_img: int | list[int] = 100, min_size: float = 1e-2,
                classes: list[torch.Tensor | None] | None = None) -> list[Detections]:
    """Per image: drop background, keep class scores > score_thresh (and, where classes[i] is
    given, only those label ids), drop boxes smaller than min_size, class-wise NMS, keep the
    detections_per_img best, rescale to the original size.

    score_thresh and detections_per_img may be given per image (one request each in a batch).
    """
    B = image_sizes.shape[0]
    thresholds = score_thresh if isinstance(score_thresh, (list, tuple)) else [score_thresh] * B
    tops = detections_per_img if isinstance(detections_per_img, (list, tuple)) else [detections_per_img] * B
    C = raw.scores.shape[1]
    scores = raw.scores[:, 1:]  # (R, C-1): background dropped
    boxes = raw.boxes[:, 1:]  # (R, C-1, 4)
    labels = torch.arange(1, C, device=scores.device).expand_as(scores)
    out = []
    for i in range(B):
        if B == 1:  # every RoI is the image's: views, no gathers (0.1 ms of a server request's 0.7)
            s, b, lab = scores.reshape(-1), boxes.reshape(-1, 4), labels.reshape(-1)
        else:
            rows = torch.nonzero(raw.batch_idx == i).flatten()
            s, b, lab = scores[rows].reshape(-1), boxes[rows].reshape(-1, 4), labels[rows].reshape(-1)
        wanted = s > thresholds[i]
        if classes is not None and classes[i] is not None:
            wanted &= torch.isin(lab, classes[i].to(lab.device))
        keep = torch.nonzero(wanted).flatten()
        s, b, lab = s[keep], b[keep], lab[keep]
        keep = remove_small_boxes(b, min_size)
        s, b, lab = s[keep], b[keep], lab[keep]
        keep = batched_nms(b, s, lab, nms_thresh)[: tops[i]]
        out.append(Detections(scale_boxes(b[keep], image_sizes[i], original_sizes[i]), s[keep], lab[keep]))
    return out
