"""Modules that flatten the detector's inputs and outputs into the graph contract (contract.py).

Shape shorthand: B images, H, W padded size, R RoIs over the batch, C classes (0 = background),
M candidate (RoI, class) pairs, K detections kept per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.library.custom_op("frcnn_export::nonzero_1d", mutates_args=())
def nonzero_1d(mask: Tensor) -> Tensor:
    """Tensor[N] bool -> Tensor[K] int64 indices of the True entries (lowered to ONNX NonZero).

    torch.nonzero on a tensor whose length is itself data dependent (the RoI count R) gives its
    count an upper bound beyond int64 that the ONNX exporter cannot write; as an op with its own
    fake, the count is a plain unbacked size.
    """
    return torch.nonzero(mask).squeeze(1)


@nonzero_1d.register_fake
def _(mask):
    return mask.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("frcnn_export::batched_nms_by_image", mutates_args=())
def batched_nms_by_image(boxes: Tensor, scores: Tensor, idxs: Tensor, groups_per_image: int,
                         iou_threshold: float) -> Tensor:
    """frcnn::batched_nms with the image (idxs // groups_per_image) as NonMaxSuppression's batch
    dimension once lowered (lowering.batched_nms_by_image): TensorRT's NMS layer bounds the candidates
    per batch item (5000), so one batch item for the whole batch would drop proposals at B >= 2.

    boxes Tensor[N, 4], scores Tensor[N] in [0, 1], idxs Tensor[N] int64 (image * groups_per_image +
    group) -> Tensor[n] int64: the same kept set as frcnn::batched_nms, image by image, each image's
    in decreasing score (what per-image top-n and rank-within-image need).
    """
    keep = torch.ops.frcnn.batched_nms(boxes, scores, idxs, iou_threshold)
    image = torch.div(idxs[keep], groups_per_image, rounding_mode="floor")
    return keep[torch.sort(image, stable=True).indices]


@batched_nms_by_image.register_fake
def _(boxes, scores, idxs, groups_per_image, iou_threshold):
    return idxs.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def route_rpn_nms(exported: torch.export.ExportedProgram, groups_per_image: int) -> int:
    """In a torch.export program of the detector, make the RPN's frcnn::batched_nms (groups: image *
    levels + level) a batched_nms_by_image, so its lowering puts images on NMS's batch dimension.
    Returns the number of calls rewritten. The model stays free of export concerns; the fake of both
    ops is the same data-dependent size, so the traced shapes stay valid."""
    count = 0
    for node in exported.graph_module.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.frcnn.batched_nms.default:
            continue
        stack = node.meta.get("nn_module_stack", {})  # {key: (module path, module type)}
        if not any(_type_name(t) == "RPN" for _, t in stack.values()):
            continue
        boxes, scores, idxs, thr = node.args
        node.target = torch.ops.frcnn_export.batched_nms_by_image.default
        node.args = (boxes, scores, idxs, int(groups_per_image), thr)
        count += 1
    exported.graph_module.recompile()
    return count


def _type_name(t) -> str:
    """A module type as nn_module_stack holds it (a class or its dotted name) -> its class name."""
    return getattr(t, "__name__", None) or str(t).rstrip("'>").split(".")[-1]


class RawGraph(nn.Module):
    """images [B, 3, H, W], image_sizes [B, 2] -> (batch_idx [R], scores [R, C], boxes [R, C, 4])."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raw = self.net(images, image_sizes)
        return raw.batch_idx, raw.scores, raw.boxes


def padded_postprocess(
    batch_idx: Tensor,
    scores: Tensor,
    boxes: Tensor,
    num_images: int,
    *,
    score_thresh: float,
    nms_thresh: float,
    min_size: float,
    max_detections: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """model.postprocess's selection (score filter, small-box removal, class-wise NMS per image,
    top-K by score), vectorised over the batch and padded to K rows per image.

    Boxes stay in resized-image pixels (the graph does not know original sizes).
    Returns boxes [B, K, 4], scores [B, K], labels [B, K] int64, num_detections [B] int64.
    """
    r, c = scores.shape
    labels = torch.arange(1, c, device=scores.device).expand(r, c - 1)  # (R, C-1)
    # (R, C, ...) -> (M, ...) with background dropped
    cand_scores = scores[:, 1:].reshape(-1)
    cand_boxes = boxes[:, 1:].reshape(-1, 4)
    cand_labels = labels.reshape(-1)
    cand_images = batch_idx[:, None].expand(r, c - 1).reshape(-1)

    keep = nonzero_1d(cand_scores > score_thresh)
    cand_scores, cand_boxes = cand_scores[keep], cand_boxes[keep]
    cand_labels, cand_images = cand_labels[keep], cand_images[keep]
    keep = torch.ops.frcnn.remove_small_boxes(cand_boxes, min_size)
    cand_scores, cand_boxes = cand_scores[keep], cand_boxes[keep]
    cand_labels, cand_images = cand_labels[keep], cand_images[keep]
    # one NMS over the batch, images on NMS's batch dimension: groups are (image, class) pairs;
    # result image by image, each in decreasing score
    keep = batched_nms_by_image(cand_boxes, cand_scores, cand_images * c + cand_labels, c, nms_thresh)
    cand_scores, cand_boxes = cand_scores[keep], cand_boxes[keep]
    cand_labels, cand_images = cand_labels[keep], cand_images[keep]

    # rank of each kept detection within its image, in score order: no sort needed, each image's
    # NMS output is already in decreasing score; count earlier detections of the same image.
    one_hot = (cand_images[:, None] == torch.arange(num_images, device=scores.device)[None]).long()  # (n, B)
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # (n,)
    within = nonzero_1d(rank < max_detections)
    img, rank = cand_images[within], rank[within]

    out_boxes = scores.new_zeros((num_images, max_detections, 4))
    out_scores = scores.new_zeros((num_images, max_detections))
    out_labels = torch.zeros((num_images, max_detections), dtype=torch.int64, device=scores.device)
    out_boxes = out_boxes.index_put((img, rank), cand_boxes[within])
    out_scores = out_scores.index_put((img, rank), cand_scores[within])
    out_labels = out_labels.index_put((img, rank), cand_labels[within])
    num = one_hot.sum(0).clamp(max=max_detections)
    return out_boxes, out_scores, out_labels, num


class NmsGraph(nn.Module):
    """images, image_sizes -> (boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B])."""

    def __init__(self, net: nn.Module, *, score_thresh: float, nms_thresh: float, min_size: float,
                 max_detections: int):
        super().__init__()
        self.net = net
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.max_detections = int(max_detections)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raw = self.net(images, image_sizes)
        return padded_postprocess(
            raw.batch_idx, raw.scores, raw.boxes, images.shape[0],
            score_thresh=self.score_thresh, nms_thresh=self.nms_thresh, min_size=self.min_size,
            max_detections=self.max_detections,
        )
