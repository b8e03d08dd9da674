"""Lowering of the `frcnn` custom ops to standard ONNX (opset >= 18), for torch.onnx.export(dynamo=True).

Each function below is traced by the exporter with onnxscript: tensor arguments arrive as graph
values, the op's non-tensor arguments (floats, ints, lists) as Python values, so Python control flow
over them (e.g. one RoiAlign per FPN level) unrolls at export time.

Only standard ops are emitted, all of them supported by onnxruntime and by the TensorRT 10 ONNX
parser (RoiAlign -> ROIAlign_TRT plugin, NonMaxSuppression -> INMSLayer); see tensorrt_ops.py.

Shape shorthand: N boxes / images, K RoIs, C channels, L FPN levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from onnxscript import opset18 as op

# NonMaxSuppression's max_output_boxes_per_class: 0 would select nothing; int32 max keeps all
# (TensorRT reads it as int32).
_NMS_KEEP_ALL = 2**31 - 1


def _i64(values: Sequence[int]):
    return op.Constant(value_ints=list(values))


def _col(x, start: int, end: int):
    """x[:, start:end] of a 2-D value."""
    return op.Slice(x, _i64([start]), _i64([end]), _i64([1]))


def _split_rois(rois):
    """rois (Tensor[K, 5]: batch_idx, x1, y1, x2, y2) -> (boxes [K, 4], batch_indices [K] int64)."""
    boxes = _col(rois, 1, 5)
    batch_indices = op.Cast(op.Squeeze(_col(rois, 0, 1), _i64([1])), to=7)  # 7 = INT64
    return boxes, batch_indices


def roi_align(
    input,
    rois,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
):
    """frcnn::roi_align -> RoiAlign (avg). Returns Tensor[K, C, oh, ow].

    torchvision's aligned=True shifts sample points by -0.5 px: ONNX "half_pixel"; aligned=False is
    the legacy "output_half_pixel". sampling_ratio 0 is adaptive (ceil(roi / bin)) in both.
    """
    boxes, batch_indices = _split_rois(rois)
    return _roi_align_boxes(input, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned)


def _roi_align_boxes(input, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned):
    oh, ow = (int(output_size[0]), int(output_size[1]))
    return op.RoiAlign(
        input,
        boxes,
        batch_indices,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=oh,
        output_width=ow,
        sampling_ratio=int(sampling_ratio),
        spatial_scale=float(spatial_scale),
    )


def fpn_levels(rois, spatial_scales: Sequence[float], canonical_scale: int, canonical_level: int):
    """Tensor[K] int64: index into spatial_scales of the FPN level each RoI is pooled from.

    level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped to the levels
    present, minus the first level, in model/ops' (and torchvision's LevelMapper's) operation order.
    log2 is Log / ln 2, exact at the powers of two where levels change.
    """
    k_min = int(round(-math.log2(spatial_scales[0])))
    k_max = int(round(-math.log2(spatial_scales[-1])))
    w = op.Sub(_col(rois, 3, 4), _col(rois, 1, 2))
    h = op.Sub(_col(rois, 4, 5), _col(rois, 2, 3))
    size = op.Sqrt(op.Squeeze(op.Mul(w, h), _i64([1])))  # (K,)
    log2 = op.Div(op.Log(op.Div(size, op.Constant(value_float=float(canonical_scale)))),
                  op.Constant(value_float=math.log(2.0)))
    level = op.Add(op.Add(op.Constant(value_float=float(canonical_level)), log2), op.Constant(value_float=1e-6))
    level = op.Clip(op.Floor(level), op.Constant(value_float=float(k_min)), op.Constant(value_float=float(k_max)))
    return op.Cast(op.Sub(level, op.Constant(value_float=float(k_min))), to=7)


def locality_order(rois):
    """Tensor[K] int64: a permutation of the RoI rows by batch index, then by top edge (ascending).

    Only speed depends on it: each RoI is pooled on its own and written back to its own row.
    onnxruntime's RoiAlign walks the feature planes RoI by RoI, so RoIs in score order (scattered
    over the image) miss the cache at every RoI; in this order consecutive RoIs reuse its lines
    (R50-FPN's 1000 RoIs: 157 -> 88 ms, measured). This is the graph's only ascending TopK, and
    export/tensorrt_ops.tensorrt_ready replaces it with the identity (TensorRT's TopK takes
    k <= 3840: fewer than a batch of 4 images' RoIs).
    """
    key = op.Add(op.Mul(op.Squeeze(_col(rois, 0, 1), _i64([1])), op.Constant(value_float=1.0e6)),
                 op.Squeeze(_col(rois, 2, 3), _i64([1])))  # batch * 1e6 + y1: images stay apart
    _, perm = op.TopK(key, op.Shape(key), largest=0, sorted=1)
    return perm


def multiscale_roi_align(
    features: Sequence,
    rois,
    output_size: Sequence[int],
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    aligned: bool = False,
):
    """frcnn::multiscale_roi_align -> one RoiAlign per FPN level over that level's RoIs only.

    Each level gathers its RoIs (NonZero + Gather), pools them (in ROI_CHANNEL_BLOCKS channel
    blocks where the channel count allows: see _roi_align_blocked), and one Gather puts the
    per-level results back in RoI order. Pooling every RoI at every level and selecting with Where
    would cost L times the RoiAlign work and more: with adaptive sampling a large RoI pooled from a
    fine level takes ceil(roi / bin)^2 samples per bin.
    Returns Tensor[K, C, oh, ow].
    """
    if len(features) == 1 or round(math.log2(spatial_scales[0])) == round(math.log2(spatial_scales[-1])):
        # one level, or every level maps to the first (MobileNet's two stride-32 maps)
        return roi_align(features[0], rois, output_size, spatial_scales[0], sampling_ratio, aligned)
    perm = locality_order(rois)  # (K,): RoI rows by image, then top edge
    rois_sorted = op.Gather(rois, perm, axis=0)
    levels = fpn_levels(rois_sorted, spatial_scales, canonical_scale, canonical_level)
    boxes, batch_indices = _split_rois(rois_sorted)
    channels = _channels(features)
    blocks = ROI_CHANNEL_BLOCKS if channels and channels % ROI_CHANNEL_BLOCKS == 0 else 1
    pooled, order = [], []
    for lvl, (feat, scale) in enumerate(zip(features, spatial_scales, strict=True)):
        pos = op.Squeeze(op.NonZero(op.Equal(levels, op.Constant(value_int=lvl))), _i64([0]))  # (K_l,)
        lvl_boxes = op.Gather(boxes, pos, axis=0)  # (K_l, 4)
        lvl_batch = op.Gather(batch_indices, pos, axis=0)  # (K_l,)
        if blocks == 1:
            pooled.append(_roi_align_boxes(feat, lvl_boxes, lvl_batch, output_size, scale, sampling_ratio, aligned))
        else:
            pooled.append(_roi_align_blocked(feat, lvl_boxes, lvl_batch, blocks, channels, output_size, scale,
                                             sampling_ratio, aligned))
        order.append(op.Gather(perm, pos, axis=0))  # (K_l,): those RoIs' original rows
    # rows back in RoI order: where = the inverse of the concatenated order (every row exactly
    # once, so the scatter overwrites all of `rows`), one Gather of the pooled rows. Cheaper than
    # writing them into a zero (K, C, oh, ow) tensor with ScatterND (R50-FPN int8 on onnxruntime:
    # ConstantOfShape + ScatterND 19 ms -> Gather 3 ms, measured).
    rows = op.Concat(*order, axis=0)  # (K,)
    n_rows = op.Shape(rows)  # [K]
    where = op.ScatterElements(rows, rows, op.Range(op.Constant(value_int=0), op.Squeeze(n_rows),
                                                    op.Constant(value_int=1)))
    if blocks == 1:
        return op.Gather(op.Concat(*pooled, axis=0), where, axis=0)
    # The same Gather, from the block-major rows: RoI r's block b is row b * K + where[r], so the
    # (K, blocks) index picks each RoI's blocks side by side, which is its (C, oh, ow) row.
    oh, ow = int(output_size[0]), int(output_size[1])
    flat = op.Reshape(op.Concat(*pooled, axis=1), _i64([-1, channels // blocks * oh * ow]))  # (blocks*K, D)
    first = op.Mul(op.Range(op.Constant(value_int=0), op.Constant(value_int=blocks), op.Constant(value_int=1)),
                   op.Squeeze(n_rows))  # (blocks,): where each block's rows start
    index = op.Add(op.Unsqueeze(where, _i64([1])), op.Unsqueeze(first, _i64([0])))  # (K, blocks)
    return op.Reshape(op.Gather(flat, index, axis=0), _i64([-1, channels, oh, ow]))


# RoiAlign over a level's channels in this many blocks (multiscale_roi_align). onnxruntime pools
# RoI by RoI, and for each RoI every channel plane in turn; with 256 planes of a fine level (31 MB at
# 152x200) no RoI finds the planes the last one read still in cache. RoIs pooled block after block
# (64 planes at a time) do: 700 RoIs on a 256x152x200 map, 2 threads, 131-138 -> 79-83 ms, the
# output bit-equal (measured; 2 blocks gained less, 8 and 16 no more).
ROI_CHANNEL_BLOCKS = 4


def _channels(features: Sequence) -> int | None:
    """The channel count every level has, when the exporter knows it (static), else None."""
    counts = set()
    for f in features:
        try:
            counts.add(int(f.shape[1]))
        except (AttributeError, IndexError, TypeError, ValueError):  # no shape, or a symbolic channel dim
            return None
    return counts.pop() if len(counts) == 1 else None


def _roi_align_blocked(feat, boxes, batch_indices, blocks: int, channels: int, output_size, spatial_scale,
                       sampling_ratio, aligned):
    """RoiAlign of (K_l,) RoIs on feat (N, C, H, W) seen as N * blocks maps of C / blocks channels
    (image n's block b is map n * blocks + b), every RoI pooled once per block, block after block.
    Returns Tensor[blocks, K_l, C / blocks * oh * ow]: the same numbers as one RoiAlign over all C."""
    oh, ow = int(output_size[0]), int(output_size[1])
    maps = op.Reshape(feat, op.Concat(_i64([-1, channels // blocks]), op.Shape(feat, start=2), axis=0))
    n = op.Shape(batch_indices)  # [K_l]
    block_ids = op.Reshape(op.Expand(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=blocks),
                                                           op.Constant(value_int=1)), _i64([1])),
                                     op.Concat(_i64([blocks]), n, axis=0)), _i64([-1]))  # (blocks*K_l,): 0..0 1..1
    map_ids = op.Add(op.Mul(op.Tile(batch_indices, _i64([blocks])), op.Constant(value_int=blocks)), block_ids)
    pooled = _roi_align_boxes(maps, op.Tile(boxes, _i64([blocks, 1])), map_ids, output_size, spatial_scale,
                              sampling_ratio, aligned)  # (blocks*K_l, C/blocks, oh, ow)
    return op.Reshape(pooled, op.Concat(_i64([blocks]), n, _i64([channels // blocks * oh * ow]), axis=0))


def nms(boxes, scores, iou_threshold: float):
    """frcnn::nms -> NonMaxSuppression. boxes Tensor[N, 4] xyxy, scores Tensor[N] -> Tensor[n] int64.

    NonMaxSuppression takes boxes [batch, N, 4] and scores [batch, classes, N] and returns
    selected_indices [n, 3] (batch, class, box); with one batch and one class the box column, in
    selection order, is the kept indices by decreasing score (onnxruntime and TensorRT's INMSLayer
    both select in score order). IoU > threshold suppresses, as torchvision; center_point_box 0 = xyxy.
    """
    selected = op.NonMaxSuppression(
        op.Unsqueeze(boxes, _i64([0])),  # (1, N, 4)
        op.Unsqueeze(scores, _i64([0, 1])),  # (1, 1, N)
        op.Constant(value_ints=[_NMS_KEEP_ALL]),
        op.Constant(value_floats=[float(iou_threshold)]),
        center_point_box=0,
    )
    return op.Squeeze(_col(selected, 2, 3), _i64([1]))


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """frcnn::batched_nms -> one NonMaxSuppression over boxes offset per idx (no two groups overlap).

    boxes Tensor[N, 4], scores Tensor[N], idxs Tensor[N] int64 -> Tensor[n] int64, decreasing score.
    The offset is idx * (max coordinate + 1), as torchvision's coordinate trick.
    """
    max_coord = op.ReduceMax(boxes, keepdims=0)
    offset = op.Mul(op.Cast(idxs, to=1), op.Add(max_coord, op.Constant(value_float=1.0)))  # (N,)
    shifted = op.Add(boxes, op.Unsqueeze(offset, _i64([1])))
    return nms(shifted, scores, iou_threshold)


def batched_nms_by_image(boxes, scores, idxs, groups_per_image: int, iou_threshold: float):
    """frcnn_export::batched_nms_by_image -> one NonMaxSuppression with the batch's images on its
    batch dimension (image = idxs // groups_per_image) and the groups inside an image by offsets.

    boxes Tensor[N, 4], scores Tensor[N] in [0, 1], idxs Tensor[N] int64 -> Tensor[n] int64, image by
    image, each in decreasing score. Every batch item sees all N boxes but only its own image's
    scores; the others get -1, under the score threshold, so NMS filters them before it counts
    candidates (TensorRT's INMSLayer: at most 5000 per batch item, after the score filter). The
    selected box index is then directly the index into the N inputs.
    """
    image = op.Div(idxs, op.Constant(value_int=int(groups_per_image)))  # (N,) int64, idxs >= 0: floor
    # batch items 0..max(image); a 0 appended so an empty input still gives one (empty) item
    num = op.Add(op.ReduceMax(op.Concat(image, _i64([0]), axis=0), keepdims=1), _i64([1]))  # (1,)
    items = op.Range(op.Constant(value_int=0), op.Squeeze(num), op.Constant(value_int=1))  # (B,)
    mine = op.Equal(op.Unsqueeze(items, _i64([1])), op.Unsqueeze(image, _i64([0])))  # (B, N)
    batch_scores = op.Where(mine, op.Unsqueeze(scores, _i64([0])), op.Constant(value_float=-1.0))
    max_coord = op.ReduceMax(op.Concat(op.Reshape(boxes, _i64([-1])), op.Constant(value_floats=[0.0]), axis=0),
                             keepdims=0)
    offset = op.Mul(op.Cast(idxs, to=1), op.Add(max_coord, op.Constant(value_float=1.0)))  # (N,)
    shifted = op.Add(boxes, op.Unsqueeze(offset, _i64([1])))  # (N, 4), groups never overlap
    batch_boxes = op.Expand(op.Unsqueeze(shifted, _i64([0])), op.Concat(num, _i64([1, 4]), axis=0))  # (B, N, 4)
    selected = op.NonMaxSuppression(
        batch_boxes,
        op.Unsqueeze(batch_scores, _i64([1])),  # (B, 1, N)
        op.Constant(value_ints=[_NMS_KEEP_ALL]),
        op.Constant(value_floats=[float(iou_threshold)]),
        op.Constant(value_floats=[-0.5]),  # drops the other images' -1 scores, keeps every real score
        center_point_box=0,
    )  # (n, 3): (batch item, class 0, box), by item, each in selection (decreasing score) order
    return op.Squeeze(_col(selected, 2, 3), _i64([1]))


def box_area(boxes):
    """Tensor[N, 4] -> Tensor[N]."""
    w = op.Sub(_col(boxes, 2, 3), _col(boxes, 0, 1))
    h = op.Sub(_col(boxes, 3, 4), _col(boxes, 1, 2))
    return op.Squeeze(op.Mul(w, h), _i64([1]))


def box_iou(boxes1, boxes2):
    """Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]."""
    a1 = op.Unsqueeze(box_area(boxes1), _i64([1]))  # (N, 1)
    a2 = op.Unsqueeze(box_area(boxes2), _i64([0]))  # (1, M)
    b1 = op.Unsqueeze(boxes1, _i64([1]))  # (N, 1, 4)
    b2 = op.Unsqueeze(boxes2, _i64([0]))  # (1, M, 4)
    lt = op.Max(op.Slice(b1, _i64([0]), _i64([2]), _i64([2])), op.Slice(b2, _i64([0]), _i64([2]), _i64([2])))
    rb = op.Min(op.Slice(b1, _i64([2]), _i64([4]), _i64([2])), op.Slice(b2, _i64([2]), _i64([4]), _i64([2])))
    wh = op.Relu(op.Sub(rb, lt))  # (N, M, 2)
    inter = op.Squeeze(op.Mul(op.Slice(wh, _i64([0]), _i64([1]), _i64([2])),
                              op.Slice(wh, _i64([1]), _i64([2]), _i64([2]))), _i64([2]))
    return op.Div(inter, op.Sub(op.Add(a1, a2), inter))


def clip_boxes(boxes, image_size):
    """boxes Tensor[..., 4], image_size Tensor[..., 2] (h, w), broadcastable -> Tensor[..., 4]."""
    size = op.CastLike(image_size, boxes)
    h = op.Slice(size, _i64([0]), _i64([1]), _i64([-1]))
    w = op.Slice(size, _i64([1]), _i64([2]), _i64([-1]))
    limit = op.Concat(w, h, w, h, axis=-1)  # (..., 4)
    return op.Min(op.Relu(boxes), limit)


def remove_small_boxes(boxes, min_size: float):
    """Tensor[N, 4] -> Tensor[K] int64: indices of boxes with both sides >= min_size."""
    w = op.Sub(_col(boxes, 2, 3), _col(boxes, 0, 1))
    h = op.Sub(_col(boxes, 3, 4), _col(boxes, 1, 2))
    m = op.Constant(value_float=float(min_size))
    keep = op.And(op.GreaterOrEqual(w, m), op.GreaterOrEqual(h, m))  # (N, 1)
    return op.Squeeze(op.NonZero(op.Squeeze(keep, _i64([1]))), _i64([0]))


def roi_pool(input, rois, output_size: Sequence[int], spatial_scale: float):
    """frcnn::roi_pool -> MaxRoiPool (rois in the same (batch_idx, x1, y1, x2, y2) layout; corners
    rounded half away from zero, inclusive ends, empty bins 0: torchvision's semantics).

    The op also returns the argmax that only its backward reads; inference never uses it, so it is
    lowered to zeros that dead-code elimination removes. Not parsed by TensorRT (vgg16_c4 only).
    """
    pooled = op.MaxRoiPool(input, rois, pooled_shape=[int(output_size[0]), int(output_size[1])],
                           spatial_scale=float(spatial_scale))
    unused_argmax = op.ConstantOfShape(op.Shape(pooled), value=_int64_zero())
    return pooled, unused_argmax


def _int64_zero():
    import onnx

    return onnx.helper.make_tensor("zero", onnx.TensorProto.INT64, [1], [0])


def nonzero_1d(mask):
    """frcnn_export::nonzero_1d (export/wrappers.py): Tensor[N] bool -> Tensor[K] int64."""
    return op.Squeeze(op.NonZero(mask), _i64([0]))


_LOWERINGS: dict[str, Callable] = {
    "roi_align": roi_align,
    "multiscale_roi_align": multiscale_roi_align,
    "roi_pool": roi_pool,
    "nms": nms,
    "batched_nms": batched_nms,
    "box_area": box_area,
    "box_iou": box_iou,
    "clip_boxes": clip_boxes,
    "remove_small_boxes": remove_small_boxes,
}


def translation_table() -> dict[Callable, Callable]:
    """{torch.ops.frcnn.<op>.default: lowering} for every frcnn op registered in this process."""
    import export.wrappers  # noqa: F401  (registers torch.ops.frcnn_export.*)
    import model.ops  # noqa: F401  (registers torch.ops.frcnn.*)

    table = {torch.ops.frcnn_export.nonzero_1d.default: nonzero_1d,
             torch.ops.frcnn_export.batched_nms_by_image.default: batched_nms_by_image}
    for name, fn in _LOWERINGS.items():
        packet = getattr(torch.ops.frcnn, name, None)
        if packet is not None:
            table[packet.default] = fn
    return table
