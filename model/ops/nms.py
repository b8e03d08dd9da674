"""Non-maximum suppression as `frcnn::nms` and `frcnn::batched_nms` custom ops.

Shape shorthand: N boxes in, K kept; boxes are (x1, y1, x2, y2) in absolute pixels.

Semantics are torchvision's: boxes are visited by decreasing score (stable for ties), a box is
dropped when its IoU with an already kept box is > iou_threshold, and the kept indices come out
sorted by decreasing score.

Algorithm (vectorised, no per-box Python loop): the score-sorted boxes that are still alive are
taken in tiles of `_TILE`. Inside a tile the greedy order is resolved with a fixed-point iteration
on the tile's suppression matrix S (S[j, i]: earlier box j would suppress later box i):

    keep <- not any_j(keep[j] and S[j, i])

Box i only depends on boxes before it, so after m rounds the first m entries are final; in
practice suppression chains are short and it settles in a handful of rounds. The tile's kept
boxes then suppress everything after the tile in a (kept x rest) IoU pass, and the survivors
are compacted, so later tiles never look at dead boxes. Work is about (kept x alive) IoUs, the
same as the greedy C++ loop, but in vectorised blocks that are deliberately kept serial (see
_TILE): NMS is a chain of small dependent steps, where thread-pool barriers cost more than
they save.

Low-precision boxes (float16, bfloat16) are compared in float32, as torchvision's NMS under
autocast: IoUs near the threshold decide differently in bfloat16 (8 significant bits), so the
kept set would depend on the dtype. Under torch.autocast the op itself runs in float32.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from model.ops._checks import ArgChecker
from model.ops._precision import LOW_FLOATS, register_float32_autocast

__all__ = ["nms", "batched_nms"]

# Block sizes keep every tensor op of NMS under ATen's parallel grain (32768 elements), so NMS never
# enters the intra-op thread pool. Its ~thousand small sequential ops would otherwise each wait
# for a second thread at a barrier; on a busy machine every such wait costs a scheduler timeslice
# (measured: 36 ms on 1 thread became 3.5 s on 2 under load). Serial and cache-resident instead.
_TILE = 96  # (2, T, T) IoU temporaries: 18432 elements
_CROSS_BLOCK = 16000  # kept x rest pairs per block: (2, k, r) temporaries < 32768 elements


@functools.lru_cache(maxsize=64)
def _threshold_below(iou_threshold: float, dtype: torch.dtype) -> float:
    """Largest `dtype` value t with t <= iou_threshold, so `iou > t` (in dtype) is the same test
    as torchvision's `float(iou) > double(iou_threshold)`. A Python float holding that value
    exactly: compared with a `dtype` tensor it converts back without rounding (and, cached, costs
    none of the four small tensor ops that computing it takes, per NMS call)."""
    exact = torch.tensor(iou_threshold, dtype=torch.float64)
    t = exact.to(dtype)
    if t.double() > exact:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


def _pair_iou(a: Tensor, b: Tensor, work: Tensor | None = None) -> Tensor:
    """IoU between columns of a (5, ..., P) and b (5, ..., Q), rows (x1, y1, x2, y2, area) ->
    (..., P, Q); the middle dims (groups) must match.

    Same float operations, in the same order, as torchvision's CPU kernel, so results agree
    bit for bit (and so do threshold decisions). x and y are handled together as (2, ..., P, Q):
    fewer, larger ops. `work` (flat, >= 4 * the output's size) holds the temporaries: fresh
    multi-MB allocations are returned to the OS and page-faulted again on every call, which cost
    more than the arithmetic."""
    shape = (*a.shape[1:-1], a.shape[-1], b.shape[-1])
    size = math.prod(shape)
    if work is None:
        work = a.new_empty(4 * size)
    wh = torch.minimum(a[2:4, ..., :, None], b[2:4, ..., None, :], out=work[:2 * size].view(2, *shape))
    lt = torch.maximum(a[0:2, ..., :, None], b[0:2, ..., None, :], out=work[2 * size:4 * size].view(2, *shape))
    wh.sub_(lt).clamp_(min=0)
    inter = wh[0].mul_(wh[1])
    union = torch.add(a[4, ..., :, None], b[4, ..., None, :], out=lt[0])
    return inter.div_(union.sub_(inter))


def _greedy_keep(sup: Tensor, alive: Tensor) -> Tensor:
    """sup (..., T, T) bool: earlier box j suppresses later box i at [j, i] (strictly upper
    triangle); alive (..., T) -> (..., T) bool, exactly the greedy keep. Fixed point of
    keep <- alive and no kept earlier box suppresses it; bool ops rather than a matmul: BLAS
    threads that spin between calls are ruinous on a busy machine."""
    keep = alive
    while True:
        new = alive & ~(sup & keep[..., :, None]).any(-2)
        if torch.equal(new, keep):
            return keep
        keep = new


def _suppressed_by(kept: Tensor, kept_cls: Tensor | None, rest: Tensor, rest_cls: Tensor | None,
                   thr: float, work: Tensor) -> Tensor:
    """(5, k), (5, R) -> (R,) bool: rest boxes overlapping any kept box (of the same class)."""
    out = torch.zeros(rest.shape[1], dtype=torch.bool, device=rest.device)
    step = max(1, _CROSS_BLOCK // max(1, kept.shape[1]))
    for s in range(0, rest.shape[1], step):  # blocks of boxes, not single boxes
        hit = _pair_iou(kept, rest[:, s:s + step], work) > thr  # (k, r)
        if kept_cls is not None:
            hit &= kept_cls[:, None] == rest_cls[None, s:s + step]
        out[s:s + step] = hit.any(0)
    return out


def _resolve_tile(tile: Tensor, cls: Tensor | None, thr: float, work: Tensor) -> Tensor:
    """(5, T) score-sorted boxes -> (T,) bool keep, exactly the greedy result within the tile."""
    sup = _pair_iou(tile, tile, work) > thr  # (T, T)
    if cls is not None:
        sup &= cls[:, None] == cls[None, :]
    n = tile.shape[1]
    # strictly upper triangle (only earlier boxes suppress later ones); a compare, not triu_,
    # which always goes to the thread pool
    sup &= torch.arange(n, device=tile.device)[:, None] < torch.arange(n, device=tile.device)[None, :]
    return _greedy_keep(sup, torch.ones(n, dtype=torch.bool, device=tile.device))


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """x[..., mask] for a 1-D bool mask over the last dim. masked_select stays serial on small
    inputs where boolean indexing goes to the thread pool."""
    return torch.masked_select(x, mask).view(*x.shape[:-1], -1)


def _nms_impl(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None) -> Tensor:
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.get_default_dtype())
    elif boxes.dtype in LOW_FLOATS:
        boxes = boxes.float()  # exact: every float16 / bfloat16 value is a float32 value
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes.index_select(0, order)
    # (5, N) rows x1, y1, x2, y2, area: each row contiguous for the broadcasts in _pair_iou
    cols = torch.cat([b.t(), ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None]]).contiguous()
    cls = idxs.index_select(0, order) if idxs is not None else None
    thr = _threshold_below(float(iou_threshold), cols.dtype)

    # temporaries of the largest IoU block, (tile x tile) or (kept x rest), reused by every block
    work = cols.new_empty(4 * max(_TILE * _TILE, _CROSS_BLOCK))
    alive = order  # original indices of the boxes not yet suppressed, in score order
    kept: list[Tensor] = []
    while alive.numel() > 0:
        tile, rest = cols[:, :_TILE], cols[:, _TILE:]
        tile_cls = cls[:_TILE] if cls is not None else None
        keep = _resolve_tile(tile, tile_cls, thr, work)
        kept.append(_select(alive[:_TILE], keep))
        if rest.shape[1] == 0:
            break
        rest_cls = cls[_TILE:] if cls is not None else None
        dead = _suppressed_by(_select(tile, keep), _select(tile_cls, keep) if cls is not None else None,
                              rest, rest_cls, thr, work)
        live = ~dead
        cols, alive = _select(rest, live), _select(alive[_TILE:], live)
        cls = _select(rest_cls, live) if cls is not None else None
    return torch.cat(kept)


# --- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("frcnn::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _nms_impl(boxes, scores, iou_threshold, None)


@_nms_op.register_fake
def _(boxes, scores, iou_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


_GROUPED_ABOVE = 2000  # boxes; below it one masked pass beats a loop over groups


@torch.library.custom_op("frcnn::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return _batched_nms_impl(boxes, scores, idxs, iou_threshold)


def _batched_nms_impl(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    # Boxes of different classes never suppress each other: a class-equality mask on the
    # suppression test, exact (the coordinate-offset trick loses float precision far from 0).
    if boxes.shape[0] <= _GROUPED_ABOVE:
        return _nms_impl(boxes, scores, iou_threshold, idxs)
    # Many boxes (the RPN's images x levels, a batch's classes): the masked tiles would still
    # compare every pair across groups, O(N^2). Per group it is O(sum n_g^2); a loop over
    # groups, not boxes.
    counts = torch.unique(idxs, return_counts=True)[1]
    order = torch.argsort(idxs, stable=True)
    parts = torch.split(order, counts.tolist())
    # groups of at most _PADDED_MAX boxes all at once (padded), larger ones one by one
    small = counts <= _PADDED_MAX
    kept = [part[_nms_impl(boxes[part], scores[part], iou_threshold, None)]
            for part, is_small in zip(parts, small.tolist(), strict=True) if not is_small]
    if bool(small.any()):
        members = torch.cat([part for part, is_small in zip(parts, small.tolist(), strict=True) if is_small])
        kept.append(_nms_groups_padded(boxes, scores, idxs, members, counts[small], iou_threshold))
    # index order first, so that score ties come out in index order, as from the masked pass
    keep = torch.sort(torch.cat(kept)).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# groups up to this size run together, padded: G x _PADDED_MAX^2 pairs at most
_PADDED_MAX = 64


def _nms_groups_padded(boxes: Tensor, scores: Tensor, idxs: Tensor, order: Tensor, counts: Tensor,
                       iou_threshold: float) -> Tensor:
    """order: the groups' box indices, group after group (sizes `counts`). Their NMS at once:
    groups padded to (G, M), one (G, M, M) IoU and suppression matrix, the greedy order resolved by
    the same fixed point as a tile's (_greedy_keep), over all groups together. A detector's class-wise postprocess is
    dozens of classes with a few boxes each, one small NMS call per class before (R50-FPN stand-in
    weights, 3757 boxes in 42 classes: 18 -> 14 ms, measured). Same IoU arithmetic, same kept set."""
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.get_default_dtype())
    elif boxes.dtype in LOW_FLOATS:
        boxes = boxes.float()  # as _nms_impl
    g, m = counts.numel(), int(counts.max())
    # by group, then by decreasing score (stable: ties in index order, as _nms_impl on each group)
    by_score = torch.sort(scores[order], descending=True, stable=True).indices
    order = order[by_score][torch.sort(idxs[order][by_score], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(g, device=boxes.device), counts)
    slot = torch.arange(order.numel(), device=boxes.device) - starts[group]
    b = boxes[order]
    cols = torch.zeros((5, g, m), dtype=b.dtype, device=b.device)
    cols[:4, group, slot] = b.t()
    cols[4, group, slot] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    valid = torch.zeros((g, m), dtype=torch.bool, device=b.device)
    valid[group, slot] = True
    sup = _pair_iou(cols, cols) > _threshold_below(float(iou_threshold), b.dtype)  # (G, M, M)
    ar = torch.arange(m, device=b.device)
    sup &= (ar[:, None] < ar[None, :]) & valid[:, :, None]
    keep = _greedy_keep(sup, valid)
    slots = torch.full((g, m), -1, dtype=torch.int64, device=b.device)
    slots[group, slot] = order
    return slots[keep]


@_batched_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


# Under autocast: float32 boxes and scores (torchvision's nms_autocast); the indices need no cast back.
register_float32_autocast("nms", None)
register_float32_autocast("batched_nms", None)


# --- public API ---------------------------------------------------------------------------------


def _check(fn: str, boxes, scores, idxs=None) -> None:
    check = ArgChecker(fn)
    check.tensor("boxes", boxes, ("N", 4))
    check.tensor("scores", scores, ("N",))
    if idxs is not None:
        check.tensor("idxs", idxs, ("N",), kinds="i")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2); integer, float16 and bfloat16 boxes are
            compared in float32.
        scores (Tensor[N]).
        iou_threshold: a box is discarded when IoU > iou_threshold with a kept, higher-scored box.
    Returns:
        Tensor[K] int64: indices of kept boxes, sorted by decreasing score.
    Raises:
        ValueError: boxes not (N, 4), scores not (N,), or on different devices.
    """
    _check("nms", boxes, scores)
    return torch.ops.frcnn.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per value of idxs (class-wise).

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]), idxs (Tensor[N] integer): category of each box.
    Returns:
        Tensor[K] int64: indices of kept boxes, sorted by decreasing score.
    Raises:
        ValueError: boxes not (N, 4), scores or idxs not (N,), idxs not integer, or mixed devices.
    """
    _check("batched_nms", boxes, scores, idxs)
    return torch.ops.frcnn.batched_nms(boxes, scores, idxs, float(iou_threshold))
