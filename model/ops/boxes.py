"""Box utilities as `frcnn::` custom ops.

Shape shorthand: N, M boxes; boxes are (x1, y1, x2, y2) in absolute pixels.

Each op is a `torch.library.custom_op` with a fake implementation so `torch.export` keeps it as
one node; export/ lowers it, or turns box_area / box_iou / clip_boxes back into plain aten ops
with `DECOMPOSITIONS`. The `_*_ref` functions are the pure-torch maths; the ops call them, and
so do the decompositions.

Dtypes are torchvision's: areas, IoUs and widths are computed in the upcast dtype (float16 /
bfloat16 -> float32, int8 / int16 / uint8 -> int32; see _precision.py), so box_area returns
that dtype and box_iou float32 for low-precision or integer boxes. Unlike torchvision, box_iou
upcasts the coordinates before the intersection too, so float16 boxes give exactly the float32
IoU of the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.ops._checks import ArgChecker
from model.ops._precision import upcast, upcast_dtype

__all__ = ["DECOMPOSITIONS", "box_area", "box_iou", "clip_boxes", "remove_small_boxes"]


# --- pure-torch maths (also the decompositions export may use) ---------------------------------


def _box_area_ref(boxes: Tensor) -> Tensor:
    boxes = upcast(boxes)  # no-op (no graph node) for float32 / float64 / int32 / int64
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _box_iou_ref(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    area1 = _box_area_ref(boxes1)
    area2 = _box_area_ref(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union  # true division: integer boxes give float IoU, as torchvision


def _clip_boxes_ref(boxes: Tensor, image_size: Tensor) -> Tensor:
    # (..., 2) (h, w) -> (..., 4) upper bounds (w, h, w, h) in the boxes' dtype; stack rather
    # than a list index, which would become a tensor constant when used as a decomposition
    h, w = image_size[..., 0], image_size[..., 1]
    upper = torch.stack([w, h, w, h], -1)
    if not boxes.is_floating_point() and upper.dtype != boxes.dtype:
        # a 300 px image bound wraps in int8; bounds past the dtype's range clip nothing anyway
        upper = upper.clamp(max=torch.iinfo(boxes.dtype).max)
    return torch.minimum(boxes.clamp(min=0), upper.to(boxes.dtype))


def _small_mask(boxes: Tensor, min_size: float) -> Tensor:
    boxes = upcast(boxes)  # int8 widths of boxes across 0 wrap
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return (ws >= min_size) & (hs >= min_size)


def _iou_dtype(boxes1: Tensor, boxes2: Tensor) -> torch.dtype:
    dtype = torch.promote_types(upcast_dtype(boxes1.dtype), upcast_dtype(boxes2.dtype))
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


# --- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("frcnn::box_area", mutates_args=())
def _box_area_op(boxes: Tensor) -> Tensor:
    return _box_area_ref(boxes)


@_box_area_op.register_fake
def _(boxes):
    return boxes.new_empty(boxes.shape[:-1], dtype=upcast_dtype(boxes.dtype))


@torch.library.custom_op("frcnn::box_iou", mutates_args=())
def _box_iou_op(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    return _box_iou_ref(boxes1, boxes2)


@_box_iou_op.register_fake
def _(boxes1, boxes2):
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]), dtype=_iou_dtype(boxes1, boxes2))


@torch.library.custom_op("frcnn::clip_boxes", mutates_args=())
def _clip_boxes_op(boxes: Tensor, image_size: Tensor) -> Tensor:
    return _clip_boxes_ref(boxes, image_size)


@_clip_boxes_op.register_fake
def _(boxes, image_size):
    shape = torch.broadcast_shapes(boxes.shape, (*image_size.shape[:-1], 4))
    return boxes.new_empty(shape)


@torch.library.custom_op("frcnn::remove_small_boxes", mutates_args=())
def _remove_small_boxes_op(boxes: Tensor, min_size: float) -> Tensor:
    return _remove_small_boxes_impl(boxes, min_size)


def _remove_small_boxes_impl(boxes: Tensor, min_size: float) -> Tensor:  # also model.ops.eager's
    return torch.where(_small_mask(boxes, min_size))[0]


@_remove_small_boxes_op.register_fake
def _(boxes, min_size):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


# Gradients: the maths is cheap, so backward re-runs the reference under autograd instead of
# hand-writing derivatives that would have to be kept in sync with it.


def _grad_via_ref(ref, inputs: tuple[Tensor, ...], differentiable: tuple[bool, ...], grad: Tensor):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(d) for x, d in zip(inputs, differentiable, strict=True)]
        out = ref(*leaves)
        wrt = [x for x, d in zip(leaves, differentiable, strict=True) if d]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    return tuple(next(grads) if d else None for d in differentiable)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_box_area_op.register_autograd(
    lambda ctx, g: _grad_via_ref(_box_area_ref, ctx.saved_tensors, (True,), g),
    setup_context=_save_inputs,
)
_box_iou_op.register_autograd(
    lambda ctx, g: _grad_via_ref(_box_iou_ref, ctx.saved_tensors, (True, True), g),
    setup_context=_save_inputs,
)
_clip_boxes_op.register_autograd(
    lambda ctx, g: _grad_via_ref(_clip_boxes_ref, ctx.saved_tensors, (True, False), g),
    setup_context=_save_inputs,
)


# Plain-aten versions of the shape-static box ops, for `ExportedProgram.run_decompositions`
# (merge into `torch.export.default_decompositions()`): export/ then needs no lowering for them.
DECOMPOSITIONS = {
    torch.ops.frcnn.box_area.default: _box_area_ref,
    torch.ops.frcnn.box_iou.default: _box_iou_ref,
    torch.ops.frcnn.clip_boxes.default: _clip_boxes_ref,
}


# --- public API ---------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    """Area of boxes.

    Args:
        boxes (Tensor[..., 4]): (x1, y1, x2, y2), floating or integer.
    Returns:
        Tensor[...] in the upcast dtype: float32 for float16 / bfloat16 boxes, int32 for
        int8 / int16 / uint8, else the boxes' dtype (torchvision's box_area).
    """
    ArgChecker("box_area").tensor("boxes", boxes, ("...", 4))
    return torch.ops.frcnn.box_area(boxes)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): (x1, y1, x2, y2), floating or integer.
    Returns:
        Tensor[N, M]: float32 for float16 / bfloat16 / integer boxes, computed in float32 from
        the boxes' values; float64 when either is float64. Two empty boxes give NaN (0 / 0), as
        torchvision.
    """
    check = ArgChecker("box_iou")
    check.tensor("boxes1", boxes1, ("N", 4))
    check.tensor("boxes2", boxes2, ("M", 4))
    return torch.ops.frcnn.box_iou(boxes1, boxes2)


def clip_boxes(boxes: Tensor, image_size: Tensor) -> Tensor:
    """Clip boxes to their image: x to [0, w], y to [0, h].

    Args:
        boxes (Tensor[..., 4]): (x1, y1, x2, y2).
        image_size (Tensor[..., 2]): (h, w), broadcastable against boxes[..., :2]
            (e.g. boxes (R, C, 4) with image_size (R, 1, 2)).
    Returns:
        Tensor[..., 4], the broadcast shape, boxes' dtype.
    """
    check = ArgChecker("clip_boxes")
    check.tensor("boxes", boxes, ("...", 4))
    check.tensor("image_size", image_size, ("...", 2))
    try:
        if all(isinstance(s, int) for s in (*boxes.shape, *image_size.shape)):  # symbolic: the fake checks
            torch.broadcast_shapes(boxes.shape[:-1], image_size.shape[:-1])
    except RuntimeError:
        check.fail(f"image_size (..., 2) must broadcast against boxes (..., 4): got image_size "
                   f"{tuple(image_size.shape)} for boxes {tuple(boxes.shape)}")
    return torch.ops.frcnn.clip_boxes(boxes, image_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= min_size.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2), floating or integer.
    Returns:
        Tensor[K] int64, increasing.
    """
    ArgChecker("remove_small_boxes").tensor("boxes", boxes, ("N", 4))
    return torch.ops.frcnn.remove_small_boxes(boxes, float(min_size))
