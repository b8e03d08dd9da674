"""Detector ops as `frcnn::` custom ops (fake impls for torch.export, autograd where it matters).

Boxes are (x1, y1, x2, y2) in absolute pixels; RoIs are (batch_idx, x1, y1, x2, y2).
Importing this package registers the ops under torch.ops.frcnn.
"""

from model.ops.boxes import DECOMPOSITIONS, box_area, box_iou, clip_boxes, remove_small_boxes
from model.ops.multiscale import map_levels, multiscale_roi_align
from model.ops.nms import batched_nms, nms
from model.ops.roi_align import roi_align
from model.ops.roi_pool import roi_pool

__all__ = [
    "DECOMPOSITIONS",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "map_levels",
    "multiscale_roi_align",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]
