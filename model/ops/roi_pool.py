"""RoIPool (Fast R-CNN) as the `frcnn::roi_pool` custom op, with autograd via argmax routing.

Shape shorthand: N images, C channels, H, W feature size, K RoIs, (oh, ow) output size,
Bh, Bw the largest bin (in feature pixels) of a chunk of RoIs.

Semantics are torchvision's `roi_pool`: RoI corners rounded (half away from zero) after scaling,
sides at least 1 pixel (end inclusive), bin p spanning [floor(p * bin), ceil((p + 1) * bin)) from
the RoI start, clipped to the map; the max over the bin, or 0 for an empty bin.

The op returns (output, argmax) like torchvision's: argmax (int32) is the flat spatial index
h * W + w of the max in the RoI's image (-1 for empty bins), which backward routes the gradient
to; the first maximum in row-major order, as torchvision's loop. Both are channels last in memory.

Two paths, equal to the bit (tests/model/test_ops_roi.py). On CPU with finite input, a RoI whose
bins are exactly those adaptive max pooling gives its crop (nearly all: _crop_is_bins) is pooled
by adaptive_max_pool2d over its crop of the channels-last map, which reads each pixel of the crop
once. Any other RoI (bins that float32 pushes one pixel past the RoI, corners far outside the map,
NaN or infinite input, other devices) takes the gather: every bin's window gathered, padded to
the chunk's largest bin, and reduced with max. VGG16's 300 test RoIs on a 608x1024 image's
conv5_3: 1.35-1.47 s all gathered, 0.10-0.15 s with the crops (benchmarks/ops.py, roi_pool_vgg16).

float16 / bfloat16 input: the bin geometry is computed in float32 (bfloat16 RoI corners times
spatial_scale round to other pixels); the max itself is exact in any dtype, so the values are
read in the input dtype. Backward accumulates in float32. Under torch.autocast the op runs in
float32 and its output is cast back to the input's dtype, as torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.ops._precision import compute_dtype, register_float32_autocast
from model.ops.roi_align import _channels_last, _chunks, _pair, check_roi_args

__all__ = ["roi_pool"]

# Upper bound on gathered elements (bins * window * channels) per block: ~32 MB of float32.
_GATHER_BUDGET = 1 << 23


def _round_half_away(x: Tensor) -> Tensor:
    """std::round: half away from zero (torch.round is half to even). float64 keeps x + 0.5 exact."""
    x = x.double()
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5)).to(torch.int64)


def _bin_edges(start: Tensor, bin_size: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """start (K,) int64 RoI start, bin_size (K,) -> lo, hi (K, n_out) int64, not yet clipped."""
    p = torch.arange(n_out, device=start.device, dtype=bin_size.dtype)
    lo = torch.floor(p[None] * bin_size[:, None]).to(torch.int64) + start[:, None]
    hi = torch.ceil((p[None] + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
    return lo, hi


def _outputs(input: Tensor, k: int, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Uninitialised (output, argmax), (K, C, oh, ow) with channels last in memory (the layout
    both paths write in; the fake implementation's too). argmax is int32, as torchvision's."""
    c = input.shape[1]
    out = input.new_empty((k, *size, c)).permute(0, 3, 1, 2)
    return out, torch.empty_like(out, dtype=torch.int32)


def _forward(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float, *,
             crops: bool = True) -> tuple[Tensor, Tensor]:
    """The op's kernel; crops=False sends every RoI through the gather (tests, benchmarks)."""
    h, w = input.shape[2:]
    oh, ow = output_size
    k = rois.shape[0]
    out, arg = _outputs(input, k, output_size)
    if k == 0 or input.numel() == 0:
        return out.fill_(0), arg.fill_(-1)
    dtype = compute_dtype(input.dtype)
    corners = _round_half_away(rois[:, 1:].to(dtype) * spatial_scale)  # (K, 4) x1, y1, x2, y2
    roi_w = (corners[:, 2] - corners[:, 0] + 1).clamp(min=1)
    roi_h = (corners[:, 3] - corners[:, 1] + 1).clamp(min=1)
    y_edges = _bin_edges(corners[:, 1], roi_h.to(dtype) / oh, oh)  # (K, oh) each
    x_edges = _bin_edges(corners[:, 0], roi_w.to(dtype) / ow, ow)  # (K, ow) each
    batch = rois[:, 0].to(torch.int64)
    # Infinities and NaN take the gather: the crop kernel's -inf margin could tie with an input's,
    # and it keeps the last NaN of a bin where the gather keeps the first.
    if crops and input.device.type == "cpu" and bool(input.isfinite().all()):
        by_crop = (_crop_is_bins(corners[:, 1], roi_h, y_edges, h)
                   & _crop_is_bins(corners[:, 0], roi_w, x_edges, w))
    else:
        by_crop = torch.zeros(k, dtype=torch.bool, device=input.device)
    if bool(by_crop.any()):
        _pool_crops(input, by_crop.nonzero().flatten(), batch, corners[:, :2], roi_h, roi_w, out, arg)
    if not bool(by_crop.all()):
        clipped = [(lo.clamp(0, size), hi.clamp(0, size)) for (lo, hi), size in ((y_edges, h), (x_edges, w))]
        _pool_gathered(input, (~by_crop).nonzero().flatten(), batch, *clipped, out, arg)
    return out, arg


# Map pixels of -inf around the map for the crop path: a proposal clipped to the image can still
# reach one feature pixel past the map (its end rounds up to the map's size, and ends are inclusive).
_MARGIN = 2


def _crop_is_bins(start: Tensor, side: Tensor, edges: tuple[Tensor, Tensor], size: int) -> Tensor:
    """(K,) True where adaptive max pooling of the RoI's crop of the map padded with _MARGIN has
    torchvision's bins along this axis, so gives its values and argmax over finite input.

    The crop's bin p is [floor(p * side / n), ceil((p + 1) * side / n)) in exact integers,
    torchvision's the float32 bin size times p, floored / ceiled: they differ only where
    p * side / n is an integer that float32 misses. A bin that torchvision clips to the map has
    the same max (the margin's -inf never wins over finite pixels) and first maximum (a clipped
    bin starts inside the map unless it is empty, which _pool_crops sets to 0)."""
    lo, hi = edges
    n = lo.shape[1]
    p = torch.arange(n, device=start.device)
    a_lo = start[:, None] + (p * side[:, None]) // n
    a_hi = start[:, None] + ((p + 1) * side[:, None] + n - 1) // n
    inside = (start >= -_MARGIN) & (start + side <= size + _MARGIN)
    return inside & (a_lo == lo).all(1) & (a_hi == hi).all(1)


def _pool_crops(input: Tensor, ids: Tensor, batch: Tensor, starts: Tensor, roi_h: Tensor, roi_w: Tensor,
                out: Tensor, arg: Tensor) -> None:
    """RoIs whose bins are their crop's adaptive bins (_crop_is_bins): rows `ids` of out and arg.

    adaptive_max_pool2d over each crop of the channels-last map, one call per RoI: the
    channels-last kernel keeps the first maximum in row-major order (only a strictly greater value
    replaces it), as torchvision's loop, and reads each crop once instead of gathering padded
    windows (benchmarks/ops.py, roi_pool_vgg16). Each RoI's results are written in place while
    still in cache: the values straight into its output row, the argmax (row * crop width +
    column) mapped to the image's h * W + w through the crop's table of pixels."""
    n, c, h, w = input.shape
    m = _MARGIN
    feat = torch.empty((n, c, h + 2 * m, w + 2 * m), dtype=input.dtype, memory_format=torch.channels_last)
    feat.fill_(float("-inf"))
    feat[:, :, m:m + h, m:m + w] = input
    crop_arg = torch.empty((1, *out.shape[2:], c), dtype=torch.int64).permute(0, 3, 1, 2)
    rows = zip(ids.tolist(), batch[ids].tolist(), starts[ids, 1].tolist(), starts[ids, 0].tolist(),
               roi_h[ids].tolist(), roi_w[ids].tolist(), strict=True)
    for j, b, y, x, dy, dx in rows:
        o = out[j:j + 1]
        torch.ops.aten.adaptive_max_pool2d.out(feat[b:b + 1, :, y + m:y + m + dy, x + m:x + m + dx],
                                               out.shape[2:], out=o, indices=crop_arg)
        pixels = ((torch.arange(y, y + dy, dtype=torch.int32) * w)[:, None]
                  + torch.arange(x, x + dx, dtype=torch.int32)).view(-1)
        a = arg[j:j + 1]
        # channels last: (1, oh, ow, C) views of both are contiguous
        torch.index_select(pixels, 0, crop_arg.permute(0, 2, 3, 1).view(-1), out=a.permute(0, 2, 3, 1).view(-1))
        if y < 0 or x < 0 or y + dy > h or x + dx > w:
            # a bin wholly in the margin is empty: torchvision's 0 and -1
            empty = o == float("-inf")
            o.masked_fill_(empty, 0)
            a.masked_fill_(empty, -1)


def _pool_gathered(input: Tensor, ids: Tensor, batch: Tensor, y_edges: tuple[Tensor, Tensor],
                   x_edges: tuple[Tensor, Tensor], out: Tensor, arg: Tensor) -> None:
    """Any RoI (bins clipped to the map, any input, any device): every bin's window gathered from
    the channels-last map, padded to the chunk's largest bin, and reduced with max."""
    n, c, h, w = input.shape
    oh, ow = out.shape[2:]
    (y_lo, y_hi), (x_lo, x_hi) = (e[ids] for e in y_edges), (e[ids] for e in x_edges)
    feat = _channels_last(input)
    bin_h = (y_hi - y_lo).amax(1).clamp(min=1)  # (k,) largest bin per RoI
    bin_w = (x_hi - x_lo).amax(1).clamp(min=1)
    for sub in _chunks(bin_h * bin_w, oh * ow * c, _GATHER_BUDGET):
        bh, bw = int(bin_h[sub].max()), int(bin_w[sub].max())
        ys = y_lo[sub, :, None] + torch.arange(bh, device=input.device)  # (k, oh, Bh)
        xs = x_lo[sub, :, None] + torch.arange(bw, device=input.device)  # (k, ow, Bw)
        in_y = ys < y_hi[sub, :, None]
        in_x = xs < x_hi[sub, :, None]
        ys, xs = ys.clamp(max=h - 1), xs.clamp(max=w - 1)  # padding taps: any valid pixel
        # (k, oh, 1, Bh, 1) and (k, 1, ow, 1, Bw) -> (k, oh, ow, Bh*Bw) spatial index in the image
        pos = (ys * w)[:, :, None, :, None] + xs[:, None, :, None, :]
        inside = in_y[:, :, None, :, None] & in_x[:, None, :, None, :]
        kk = sub.numel()
        pos = pos.reshape(kk, oh, ow, bh * bw)
        inside = inside.reshape(kk, oh, ow, bh * bw)
        flat = pos + (batch[ids[sub]] * (h * w))[:, None, None, None]
        vals = feat.index_select(0, flat.reshape(-1)).view(kk, oh, ow, bh * bw, c)
        vals = vals.masked_fill(~inside[..., None], float("-inf"))
        best, which = vals.max(dim=3)  # (k, oh, ow, C): first maximum, row-major window order
        empty = ~inside.any(3)  # (k, oh, ow)
        best = best.masked_fill(empty[..., None], 0)
        arg_pos = torch.gather(pos, 3, which).masked_fill(empty[..., None], -1).to(torch.int32)
        out.index_copy_(0, ids[sub], best.permute(0, 3, 1, 2))
        arg.index_copy_(0, ids[sub], arg_pos.permute(0, 3, 1, 2))


def _backward(grad: Tensor, argmax: Tensor, rois: Tensor, input_shape: Sequence[int]) -> Tensor:
    """grad, argmax (K, C, oh, ow) -> (N, C, H, W): each bin's gradient goes to its max."""
    n, c, h, w = input_shape
    gin = grad.new_zeros((n, c, h * w))
    k = rois.shape[0]
    if k > 0 and gin.numel() > 0:
        batch = rois[:, 0].to(torch.int64)
        # flat index into (N, C, H*W): (batch * C + channel) * H*W + argmax
        plane = batch[:, None] * c + torch.arange(c, device=grad.device)[None]  # (K, C)
        idx = plane[:, :, None, None] * (h * w) + argmax
        valid = argmax >= 0
        gin.view(-1).index_add_(0, idx[valid], grad[valid])
    return gin.view(n, c, h, w)


# --- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("frcnn::roi_pool", mutates_args=())
def _roi_pool_op(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float
                 ) -> tuple[Tensor, Tensor]:
    return _forward(input, rois, output_size, spatial_scale)


@_roi_pool_op.register_fake
def _(input, rois, output_size, spatial_scale):
    return _outputs(input, rois.shape[0], output_size)


@torch.library.custom_op("frcnn::roi_pool_backward", mutates_args=())
def _roi_pool_backward_op(grad: Tensor, argmax: Tensor, rois: Tensor, input_shape: Sequence[int]
                          ) -> Tensor:
    work = compute_dtype(grad.dtype)  # float16 / bfloat16: sums of bin gradients in float32
    return _backward(grad.to(work), argmax, rois, input_shape).to(grad.dtype)


@_roi_pool_backward_op.register_fake
def _(grad, argmax, rois, input_shape):
    return grad.new_empty(tuple(input_shape))


def _setup_context(ctx, inputs, output):
    input, rois = inputs[0], inputs[1]
    ctx.save_for_backward(output[1], rois)
    ctx.input_shape = list(input.shape)


def _grad(ctx, grad, _grad_argmax):
    argmax, rois = ctx.saved_tensors
    g = torch.ops.frcnn.roi_pool_backward(grad.contiguous(), argmax, rois, ctx.input_shape)
    return g, None, None, None


_roi_pool_op.register_autograd(_grad, setup_context=_setup_context)
register_float32_autocast("roi_pool", lambda out, dtype: (out[0].to(dtype), out[1]))


# --- public API ---------------------------------------------------------------------------------


def roi_pool(input: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float = 1.0
             ) -> Tensor:
    """RoIPool (max over quantised bins), torchvision semantics.

    Args:
        input (Tensor[N, C, H, W]): features.
        rois (Tensor[K, 5]): (batch_idx, x1, y1, x2, y2) in image pixels.
        output_size: (oh, ow) or an int.
        spatial_scale: feature pixels per image pixel (1/stride).
    Returns:
        Tensor[K, C, oh, ow], input dtype; empty bins are 0. Differentiable wrt input.
    Raises:
        ValueError: input not (N, C, H, W) floating, rois not (K, 5), output_size not two
            positive ints, or rois on another device.
    """
    size = _pair(output_size)
    check_roi_args("roi_pool", input, rois, size)
    return torch.ops.frcnn.roi_pool(input, rois, size, float(spatial_scale))[0]
