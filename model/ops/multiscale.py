"""Multi-scale RoIAlign over FPN levels as the `frcnn::multiscale_roi_align` custom op.

Shape shorthand: N images, C channels, L levels with maps (N, C, Hl, Wl), K RoIs, (oh, ow) output.

Each RoI is pooled from one level, chosen by its size as in the FPN paper and torchvision's
LevelMapper:  level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6),
clamped to [k_min, k_max] where k = -log2(scale) of the first and last map. Scales are passed in
explicitly (no inference from feature and image sizes), so the op has no hidden image-size input.

One op rather than Python glue around roi_align: the exported graph gets a single node that
export/ can lower level by level, and the per-level RoI counts stay inside it.

float16 / bfloat16 maps are pooled in float32 and the result cast back (roi_align's rule), and
the levels are chosen from float32 areas (torchvision's LevelMapper upcasts too: a bfloat16 area
sends RoIs near a level boundary to the other level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from model.ops._precision import compute_dtype, register_float32_autocast
from model.ops.boxes import _box_area_ref
from model.ops.roi_align import _backward as _roi_align_backward
from model.ops.roi_align import _forward as _roi_align_forward
from model.ops.roi_align import _pair, check_roi_args

__all__ = ["map_levels", "multiscale_roi_align"]


def map_levels(rois: Tensor, spatial_scales: Sequence[float], canonical_scale: int = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each RoI as an index into spatial_scales.

    Args:
        rois (Tensor[K, 5]): (batch_idx, x1, y1, x2, y2) in image pixels.
        spatial_scales: scale of each level, finest first (e.g. 1/4, 1/8, 1/16, 1/32).
    Returns:
        Tensor[K] int64 in [0, L).
    """
    k_min = int(-math.log2(spatial_scales[0]))
    k_max = int(-math.log2(spatial_scales[-1]))
    s = torch.sqrt(_box_area_ref(rois[:, 1:]))
    # same op order and float dtype as torchvision's LevelMapper
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    lvl = torch.clamp(lvl, min=k_min, max=k_max)
    return lvl.to(torch.int64) - k_min


def _forward(features: Sequence[Tensor], rois: Tensor, output_size: Sequence[int],
             spatial_scales: Sequence[float], sampling_ratio: int, canonical_scale: int,
             canonical_level: int, aligned: bool) -> Tensor:
    first = features[0]
    out = first.new_zeros((rois.shape[0], first.shape[1], output_size[0], output_size[1]))
    if rois.shape[0] == 0:
        return out
    levels = map_levels(rois, spatial_scales, canonical_scale, canonical_level)
    for lvl, (feat, scale) in enumerate(zip(features, spatial_scales, strict=True)):  # per level
        idx = torch.where(levels == lvl)[0]
        if idx.numel() > 0:
            out[idx] = _roi_align_forward(feat, rois[idx], output_size, scale, sampling_ratio, aligned)
    return out


def _backward(grad: Tensor, rois: Tensor, feature_shapes: Sequence[Sequence[int]],
              output_size: Sequence[int], spatial_scales: Sequence[float], sampling_ratio: int,
              canonical_scale: int, canonical_level: int, aligned: bool) -> list[Tensor]:
    levels = map_levels(rois, spatial_scales, canonical_scale, canonical_level)
    grads = []
    for lvl, (shape, scale) in enumerate(zip(feature_shapes, spatial_scales, strict=True)):
        idx = torch.where(levels == lvl)[0]
        if idx.numel() > 0:
            grads.append(_roi_align_backward(grad[idx], rois[idx], shape, output_size, scale,
                                             sampling_ratio, aligned))
        else:
            grads.append(grad.new_zeros(tuple(shape)))
    return grads


# --- custom ops ---------------------------------------------------------------------------------


def _split4(flat: Sequence[int]) -> list[list[int]]:
    return [list(flat[i:i + 4]) for i in range(0, len(flat), 4)]


@torch.library.custom_op("frcnn::multiscale_roi_align", mutates_args=())
def _msra_op(features: list[Tensor], rois: Tensor, output_size: Sequence[int],
             spatial_scales: Sequence[float], sampling_ratio: int, canonical_scale: int,
             canonical_level: int, aligned: bool) -> Tensor:
    dtype = features[0].dtype
    work = compute_dtype(dtype)
    if work != dtype:  # float16 / bfloat16: float32 maths, result cast back
        return _forward([f.to(work) for f in features], rois, output_size, spatial_scales, sampling_ratio,
                        canonical_scale, canonical_level, aligned).to(dtype)
    return _forward(features, rois, output_size, spatial_scales, sampling_ratio, canonical_scale,
                    canonical_level, aligned)


@_msra_op.register_fake
def _(features, rois, output_size, spatial_scales, sampling_ratio, canonical_scale, canonical_level,
      aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("frcnn::multiscale_roi_align_backward", mutates_args=())
def _msra_backward_op(grad: Tensor, rois: Tensor, feature_shapes: Sequence[int],
                      output_size: Sequence[int], spatial_scales: Sequence[float],
                      sampling_ratio: int, canonical_scale: int, canonical_level: int,
                      aligned: bool) -> list[Tensor]:
    # feature_shapes is flat (4 ints per level): the op schema has no nested int lists
    work = compute_dtype(grad.dtype)
    if work != grad.dtype:
        grads = _backward(grad.to(work), rois, _split4(feature_shapes), output_size, spatial_scales,
                          sampling_ratio, canonical_scale, canonical_level, aligned)
        return [g.to(grad.dtype) for g in grads]
    return _backward(grad, rois, _split4(feature_shapes), output_size, spatial_scales, sampling_ratio,
                     canonical_scale, canonical_level, aligned)


@_msra_backward_op.register_fake
def _(grad, rois, feature_shapes, output_size, spatial_scales, sampling_ratio, canonical_scale,
      canonical_level, aligned):
    return [grad.new_empty(tuple(s)) for s in _split4(feature_shapes)]


def _setup_context(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.shapes = [d for f in features for d in f.shape]
    ctx.args = args


def _grad(ctx, grad):
    (rois,) = ctx.saved_tensors
    grads = torch.ops.frcnn.multiscale_roi_align_backward(grad.contiguous(), rois, ctx.shapes, *ctx.args)
    return list(grads), None, None, None, None, None, None, None


_msra_op.register_autograd(_grad, setup_context=_setup_context)
register_float32_autocast("multiscale_roi_align", lambda out, dtype: out.to(dtype))


# --- public API ---------------------------------------------------------------------------------


def multiscale_roi_align(features: Sequence[Tensor], rois: Tensor, output_size: int | Sequence[int],
                         spatial_scales: Sequence[float], sampling_ratio: int,
                         canonical_scale: int = 224, canonical_level: int = 4,
                         aligned: bool = False) -> Tensor:
    """RoIAlign from the FPN level that matches each RoI's size (torchvision MultiScaleRoIAlign).

    Args:
        features (list of Tensor[N, C, Hl, Wl]): FPN maps, finest first.
        rois (Tensor[K, 5]): (batch_idx, x1, y1, x2, y2) in image pixels.
        output_size: (oh, ow) or an int.
        spatial_scales: 1/stride of each map, powers of 2 (e.g. [1/4, 1/8, 1/16, 1/32]).
        sampling_ratio: points per bin side (Faster R-CNN uses 2); <= 0 means adaptive.
    Returns:
        Tensor[K, C, oh, ow] in the maps' dtype (float16 / bfloat16 maps are pooled in float32).
        Differentiable wrt every feature map.
    Raises:
        ValueError: no maps, maps not (N, C, Hl, Wl) of one dtype and device, rois not (K, 5),
            one spatial scale per map that is not a power of 2, or output_size not two positive ints.
    """
    features = list(features)
    size = _pair(output_size)
    scales = [float(s) for s in spatial_scales]
    _check(features, rois, size, scales)
    return torch.ops.frcnn.multiscale_roi_align(features, rois, size, scales, int(sampling_ratio),
                                                int(canonical_scale), int(canonical_level), bool(aligned))


def _check(features: list[Tensor], rois: Tensor, size: list[int], scales: list[float]) -> None:
    fn = "multiscale_roi_align"
    if not features:
        raise ValueError(f"{fn}: features must be a non-empty list of (N, C, Hl, Wl) maps, got none")
    check = check_roi_args(fn, features[0], rois, size, input_name="features[0]")
    for i, f in enumerate(features[1:], 1):
        # N and C must agree with features[0]; each level has its own H, W
        check.tensor(f"features[{i}]", f, ("N", "C", f"H{i}", f"W{i}"), kinds="f")
        if f.dtype != features[0].dtype:
            check.fail(f"features[{i}] must have the dtype of features[0] ({features[0].dtype}), got {f.dtype}")
    if len(scales) != len(features):
        check.fail(f"spatial_scales must have one scale per map ({len(features)}), got {len(scales)}: {scales}")
    for s in scales:
        if not (s > 0 and math.log2(s).is_integer()):
            check.fail(f"spatial_scales must be powers of 2 (1/stride, e.g. 0.25), got {scales}")
