"""RoIAlign as the `frcnn::roi_align` custom op, with autograd (backward wrt the features).

Shape shorthand: N images, C channels, H, W feature size, K RoIs, (oh, ow) output size,
G sampling points per bin side, S = 4 * Gy * Gx (index, weight) taps per output bin.

Semantics are torchvision's `roi_align`: half-pixel shift when `aligned`, RoI sides at least 1
when not aligned, `sampling_ratio` 0 meaning ceil(roi_side / output_side) points per bin and RoI,
samples outside [-1, H] x [-1, W] contributing 0, coordinates clamped to [0, H - 1] x [0, W - 1]
for the bilinear taps, and the bin value the mean over its samples.

Bilinear interpolation and the validity test are separable in y and x, so the taps are built per
axis ((K, oh, Gy, 2) rows and (K, ow, Gx, 2) columns with their weights) and combined by
broadcasting into (K*oh*ow, S) flat indices into the channels-last feature map (N*H*W, C).
An output bin is then a weighted bag of S contiguous C-vectors, which is exactly
`embedding_bag(mode="sum", per_sample_weights=...)`: a fused, multi-threaded gather-and-sum that
never materialises the (bins, S, C) block (see benchmarks/ops.py: faster than torchvision's
scalar loop over NCHW on CPU). With more than 2 samples per bin side, the taps of a bin that read
the same row (column) are merged first, so S is bounded by the pixels a bin covers rather than
4 * Gy * Gx. Adaptive grids differ per RoI: RoIs are sorted by grid size and processed in chunks
padded to the chunk's largest grid (padding taps get weight 0).

Backward is the transpose: each tap scatters weight * grad of its bin (embedding_bag's backward).

float16 / bfloat16 features are computed in float32 (sample positions, bilinear weights and the
sums) and the result cast back, as torchvision's autocast kernel does: bfloat16 keeps 8
significant bits, so a sample at x = 100.3 would land on 100.5 (outputs were off by up to 0.047,
against torchvision's 0.005 tolerance). Under torch.autocast the op gets float32 inputs and casts
its output back the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops._checks import ArgChecker
from model.ops._precision import compute_dtype, register_float32_autocast

__all__ = ["roi_align"]

# Upper bound on taps (bins * taps per bin, before merging) whose indices and weights are built
# at once: at most ~100 MB of int64 indices + weights. Large, because every chunk repeats ~100
# small tensor ops, and on a busy machine each costs a thread-pool round trip.
_TAP_BUDGET = 1 << 23


def _axis_taps(start: Tensor, length: Tensor, grid: Tensor, g_max: int, n_out: Tensor, size: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Bilinear taps along the y and x axes at once (fewer, larger ops).

    Args:
        start, length (Tensor[2, K]): RoI start and side in feature pixels (input dtype), y then x.
        grid (Tensor[2, K] int64): sampling points per bin for each RoI (<= g_max).
        n_out (Tensor[2] int64): output bins (oh, ow); size (Tensor[2] int64): (H, W).
    Returns:
        idx (Tensor[2, K, P, g_max, 2] int64) low/high pixel, w (same shape, input dtype), with
        P = max(oh, ow); bins and samples past an axis' own count have weight 0.
    """
    dtype, device = start.dtype, start.device
    n_bins = int(n_out.max())
    size_i = size.view(2, 1, 1, 1)
    bin_size = (length / n_out.to(dtype)[:, None])[..., None, None]  # (2, K, 1, 1)
    p = torch.arange(n_bins, device=device, dtype=dtype)[:, None]
    i = torch.arange(g_max, device=device, dtype=dtype) + 0.5
    # same operation order as torchvision: start + p * bin + (i + .5) * bin / grid
    # grid 0 (an empty aligned RoI) has no samples; dividing by 1 instead keeps pos finite
    pos = start[..., None, None] + p * bin_size + i * bin_size / grid.clamp(min=1).to(dtype)[..., None, None]
    valid = ((pos >= -1.0) & (pos <= size_i.to(dtype))
             & (torch.arange(g_max, device=device) < grid[..., None, None])
             & (torch.arange(n_bins, device=device)[:, None] < n_out.view(2, 1, 1, 1)))
    pos = pos.clamp(min=0)
    # pos >= 0, so truncation is floor; the clamps only guard invalid (weight 0) taps
    last = size_i - 1
    low = torch.minimum(pos.to(torch.int64).clamp(min=0), last)
    edge = low >= last
    high = torch.where(edge, last, low + 1)
    pos = torch.where(edge, low.to(dtype), pos)
    frac = pos - low.to(dtype)
    w = torch.stack([1 - frac, frac], -1) * valid[..., None]
    return torch.stack([low, high], -1), w


def _roi_geometry(rois: Tensor, output_size: Sequence[int], spatial_scale: float,
                  sampling_ratio: int, aligned: bool, dtype: torch.dtype):
    """rois (K, 5) -> y0, x0, roi_h, roi_w (K,) in feature pixels; grid_h, grid_w (K,) int64."""
    r = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    x0 = r[:, 1] * spatial_scale - offset
    y0 = r[:, 2] * spatial_scale - offset
    roi_w = (r[:, 3] * spatial_scale - offset) - x0
    roi_h = (r[:, 4] * spatial_scale - offset) - y0
    if not aligned:  # legacy behaviour: force malformed RoIs to be 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / output_size[0]).to(torch.int64)
        grid_w = torch.ceil(roi_w / output_size[1]).to(torch.int64)
    return y0, x0, roi_h, roi_w, grid_h, grid_w


def _chunks(cost: Tensor, per_unit: int, budget: int) -> Iterator[Tensor]:
    """Yield index tensors of RoIs, sorted by cost (K,), each chunk's (count * max cost * per_unit)
    within budget (at least one RoI per chunk). Loops over chunks, never over RoIs."""
    order = torch.argsort(cost)
    sorted_cost = cost[order].tolist()
    k, start = len(sorted_cost), 0
    while start < k:
        # sorted ascending, so a chunk's maximum is its last element
        c = torch.tensor(sorted_cost[start:]).clamp(min=1) * per_unit
        fits = int((torch.arange(1, k - start + 1) * c <= budget).sum())
        end = start + max(1, fits)
        yield order[start:end]
        start = end


def _merge_taps(idx: Tensor, w: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Merge the taps of each bin that read the same pixel (many samples per pixel: large grids).

    Args:
        idx, w (Tensor[k, P, G, 2]): taps of `_axis_taps` for k RoIs, P output bins.
        length: pixels along the axis.
    Returns:
        pix (Tensor[k, P, L] int64): the pixels (rows or columns) each bin reads,
        m (Tensor[k, P, L]): m[k, p, l] = sum of w over the taps of bin p that read pix[k, p, l].
    The pixels are the contiguous window spanned by the bin's taps when that is shorter than its
    tap list, else the taps themselves (sparse samples: nothing to merge). L is the largest such
    length in the chunk; padding pixels get weight 0.
    """
    k, n_bins = idx.shape[:2]
    taps = idx.reshape(k * n_bins, -1)  # (k*P, T), T = 2G: one bin per row
    wts = w.reshape(k * n_bins, -1)
    n_taps = taps.shape[1]
    lo = taps.amin(1)
    window = taps.amax(1) - lo + 1 <= n_taps
    n_pix = int(torch.where(window, taps.amax(1) - lo + 1, n_taps).max())
    ar = torch.arange(n_pix, device=idx.device)
    pix = torch.where(window[:, None], (lo[:, None] + ar).clamp(max=length - 1),
                      taps[:, ar.clamp(max=n_taps - 1)])
    # where each tap lands in pix: its offset from lo (window) or its own slot (tap list)
    slot = torch.where(window[:, None], taps - lo[:, None], torch.arange(n_taps, device=idx.device))
    m = wts.new_zeros((k * n_bins, n_pix)).scatter_add_(1, slot, wts)
    return pix.view(k, n_bins, n_pix), m.view(k, n_bins, n_pix)


def _taps(rois: Tensor, height: int, width: int, output_size: Sequence[int], spatial_scale: float,
          sampling_ratio: int, aligned: bool, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Yield (roi_ids (k,), flat_idx (k*oh*ow, S), weights (k*oh*ow, S), count (k,)) per chunk.

    flat_idx indexes the channels-last map (N*H*W, C)."""
    oh, ow = output_size
    y0, x0, rh, rw, gh, gw = _roi_geometry(rois, output_size, spatial_scale, sampling_ratio,
                                           aligned, dtype)
    batch = rois[:, 0].to(torch.int64)
    start, length, grid = torch.stack([y0, x0]), torch.stack([rh, rw]), torch.stack([gh, gw])  # (2, K)
    n_out = torch.tensor([oh, ow], device=rois.device)
    size = torch.tensor([height, width], device=rois.device)
    for ids in _chunks(gh.clamp(min=1) * gw.clamp(min=1), 4 * oh * ow, _TAP_BUDGET):
        g_y, g_x = (max(1, g) for g in grid[:, ids].amax(1).tolist())
        taps, wts = _axis_taps(start[:, ids], length[:, ids], grid[:, ids], max(g_y, g_x), n_out, size)
        iy, wy = taps[0, :, :oh, :g_y], wts[0, :, :oh, :g_y]  # (k, oh, Gy, 2)
        ix, wx = taps[1, :, :ow, :g_x], wts[1, :, :ow, :g_x]  # (k, ow, Gx, 2)
        k = ids.numel()
        if g_y > 2:  # else at most 4 taps per bin side: merging cannot shorten the list
            iy, wy = _merge_taps(iy, wy, height)  # (k, oh, Ly)
        if g_x > 2:
            ix, wx = _merge_taps(ix, wx, width)   # (k, ow, Lx)
        row = (batch[ids, None, None] * height + iy.view(k, oh, -1)) * width  # (k, oh, Ly)
        # (k, oh, 1, Ly, 1) + (k, 1, ow, 1, Lx) -> (k*oh*ow, S)
        flat = row.view(k, oh, 1, -1, 1) + ix.view(k, 1, ow, 1, -1)
        w = wy.view(k, oh, 1, -1, 1) * wx.view(k, 1, ow, 1, -1)
        count = (gh[ids] * gw[ids]).clamp(min=1).to(dtype)
        yield ids, flat.reshape(k * oh * ow, -1), w.reshape(k * oh * ow, -1), count


def _channels_last(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C); free when x is already channels-last in memory."""
    # .contiguous() matters: for N == 1 a reshape of the permuted view is itself a view whose rows
    # are strided by H*W, and every row gather would then touch C cache lines.
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).contiguous().view(n * h * w, c)


def _forward(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float,
             sampling_ratio: int, aligned: bool) -> Tensor:
    n, c, h, w = input.shape
    oh, ow = output_size
    out = input.new_zeros((rois.shape[0], oh, ow, c))
    if rois.shape[0] == 0 or input.numel() == 0:
        return out.permute(0, 3, 1, 2).contiguous()
    feat = _channels_last(input)
    for ids, flat, wts, count in _taps(rois, h, w, output_size, spatial_scale, sampling_ratio,
                                       aligned, input.dtype):
        # a bin is a weighted bag of S feature rows: embedding_bag gathers and sums them in one
        # fused kernel, without materialising the (bins, S, C) block
        v = F.embedding_bag(flat, feat, per_sample_weights=wts, mode="sum")  # (k*oh*ow, C)
        out.index_copy_(0, ids, v.view(-1, oh, ow, c) / count[:, None, None, None])
    return out.permute(0, 3, 1, 2).contiguous()  # (K, oh, ow, C) -> (K, C, oh, ow)


def _backward(grad: Tensor, rois: Tensor, input_shape: Sequence[int], output_size: Sequence[int],
              spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """grad (K, C, oh, ow) -> (N, C, H, W): each tap scatters weight * grad of its bin.

    That scatter is embedding_bag's backward wrt its table; aten's dense kernel for it sorts the
    taps and accumulates without materialising (bins, S, C): ~1.6x faster than index_add_."""
    n, c, h, w = input_shape
    oh, ow = output_size
    gfeat = grad.new_zeros((n * h * w, c))
    if rois.shape[0] > 0 and gfeat.numel() > 0:
        g_bins = grad.permute(0, 2, 3, 1).reshape(-1, oh * ow, c)  # (K, oh*ow, C)
        no_max = torch.empty(0, dtype=torch.int64, device=grad.device)
        for ids, flat, wts, count in _taps(rois, h, w, output_size, spatial_scale, sampling_ratio,
                                           aligned, grad.dtype):
            bins, taps = flat.shape
            gb = (g_bins[ids] / count[:, None, None]).reshape(bins, c)
            # fixed-size bags: bag b holds taps [b*S, (b+1)*S)
            bag_of_tap = torch.arange(bins, device=grad.device).repeat_interleave(taps)
            bag_size = torch.full((bins,), taps, dtype=torch.int64, device=grad.device)
            gfeat += torch.ops.aten._embedding_bag_dense_backward(
                gb, flat.reshape(-1), bag_of_tap, bag_size, no_max, n * h * w, False, 0,
                wts.reshape(-1), -1)
    return gfeat.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


# --- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("frcnn::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float,
                  sampling_ratio: int, aligned: bool) -> Tensor:
    work = compute_dtype(input.dtype)
    if work != input.dtype:  # float16 / bfloat16: float32 maths, result cast back
        return _forward(input.to(work), rois, output_size, spatial_scale, sampling_ratio,
                        aligned).to(input.dtype)
    return _forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("frcnn::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, input_shape: Sequence[int],
                           output_size: Sequence[int], spatial_scale: float, sampling_ratio: int,
                           aligned: bool) -> Tensor:
    work = compute_dtype(grad.dtype)
    if work != grad.dtype:
        return _backward(grad.to(work), rois, input_shape, output_size, spatial_scale, sampling_ratio,
                         aligned).to(grad.dtype)
    return _backward(grad, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned)


@_roi_align_backward_op.register_fake
def _(grad, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned):
    return grad.new_empty(tuple(input_shape))


def _setup_context(ctx, inputs, output):
    input, rois, output_size, spatial_scale, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (list(input.shape), list(output_size), spatial_scale, sampling_ratio, aligned)


def _grad(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.frcnn.roi_align_backward(grad.contiguous(), rois, *ctx.args)
    return g, None, None, None, None, None


_roi_align_op.register_autograd(_grad, setup_context=_setup_context)
# under autocast: float32 input and RoIs, the output cast back to the input's dtype (torchvision)
register_float32_autocast("roi_align", lambda out, dtype: out.to(dtype))


# --- public API ---------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def check_roi_args(fn: str, input: Tensor, rois: Tensor, output_size: Sequence[int],
                   input_name: str = "input") -> ArgChecker:
    """The checks roi_align, roi_pool and multiscale_roi_align share."""
    check = ArgChecker(fn)
    check.tensor(input_name, input, ("N", "C", "H", "W"), kinds="f")
    check.tensor("rois", rois, ("K", 5))
    check.output_size("output_size", output_size)
    return check


def roi_align(input: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (Mask R-CNN), torchvision semantics.

    Args:
        input (Tensor[N, C, H, W]): features.
        rois (Tensor[K, 5]): (batch_idx, x1, y1, x2, y2) in image pixels.
        output_size: (oh, ow) or an int for square bins.
        spatial_scale: feature pixels per image pixel (1/stride).
        sampling_ratio: points per bin side; <= 0 means adaptive ceil(roi_side / output_side).
        aligned: shift by -0.5 pixel so that pixel centres line up (Detectron2 behaviour).
    Returns:
        Tensor[K, C, oh, ow], input dtype (float16 / bfloat16 input is computed in float32).
        Differentiable wrt input.
    Raises:
        ValueError: input not (N, C, H, W) floating, rois not (K, 5), output_size not two
            positive ints, or rois on another device.
    """
    size = _pair(output_size)
    check_roi_args("roi_align", input, rois, size)
    return torch.ops.frcnn.roi_align(input, rois, size, float(spatial_scale), int(sampling_ratio), bool(aligned))
