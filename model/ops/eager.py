"""Two ops' computations called directly, for eager code on tensors it made itself
(model.postprocess): no argument checks, no custom-op dispatch, no autocast wrapper. The same
functions run inside the `frcnn::` ops, so the results are the same; on a server request's few
dozen boxes the dispatch was 0.1-0.2 ms of a 0.7 ms postprocess. Anything traced, exported or
compiled, or taking a caller's tensors, uses model.ops.

Boxes are (x1, y1, x2, y2) in absolute pixels.
"""

from __future__ import annotations

from torch import Tensor

from model.ops.boxes import _remove_small_boxes_impl
from model.ops.nms import _batched_nms_impl

__all__ = ["batched_nms", "remove_small_boxes"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """model.ops.batched_nms without its checks: boxes (N, 4), scores (N,), idxs (N,) integer ->
    (K,) int64 kept indices by decreasing score."""
    return _batched_nms_impl(boxes, scores, idxs, float(iou_threshold))


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """model.ops.remove_small_boxes without its checks: (N, 4) -> (K,) int64, increasing."""
    return _remove_small_boxes_impl(boxes, float(min_size))
