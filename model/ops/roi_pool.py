"""RoIPool (Fast R-CNN) as the `frcnn::roi_pool` custom op, with autograd via argmax routing.

Shape shorthand: N images, C channels, H, W feature size, K RoIs, (oh, ow) output size,
Bh, Bw the largest bin (in feature pixels) of a chunk of RoIs.

Semantics are torchvision's `roi_pool`: RoI corners rounded (half away from zero) after scaling,
sides at least 1 pixel (end inclusive), bin p spanning [floor(p * bin), ceil((p + 1) * bin)) from
the RoI start, clipped to the map; the max over the bin, or 0 for an empty bin.

The op returns (output, argmax) like torchvision's: argmax is the flat spatial index h * W + w of
the max in the RoI's image (-1 for empty bins), which backward routes the gradient to.
Vectorised by gathering every bin's window, padded to the chunk's largest bin, from the
channels-last map and reducing with max (first maximum in row-major order, as the C++ loop).

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


def _bin_edges(start: Tensor, bin_size: Tensor, n_out: int, size: int) -> tuple[Tensor, Tensor]:
    """start (K,) int64 RoI start, bin_size (K,) -> lo, hi (K, n_out) int64 clipped to [0, size]."""
    p = torch.arange(n_out, device=start.device, dtype=bin_size.dtype)
    lo = torch.floor(p[None] * bin_size[:, None]).to(torch.int64) + start[:, None]
    hi = torch.ceil((p[None] + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _forward(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float
             ) -> tuple[Tensor, Tensor]:
    n, c, h, w = input.shape
    oh, ow = output_size
    k = rois.shape[0]
    out = input.new_zeros((k, oh, ow, c))
    arg = torch.full((k, oh, ow, c), -1, dtype=torch.int64, device=input.device)
    if k == 0 or input.numel() == 0:
        return out.permute(0, 3, 1, 2).contiguous(), arg.permute(0, 3, 1, 2).contiguous()
    dtype = compute_dtype(input.dtype)
    corners = _round_half_away(rois[:, 1:].to(dtype) * spatial_scale)  # (K, 4) x1, y1, x2, y2
    roi_w = (corners[:, 2] - corners[:, 0] + 1).clamp(min=1)
    roi_h = (corners[:, 3] - corners[:, 1] + 1).clamp(min=1)
    y_lo, y_hi = _bin_edges(corners[:, 1], roi_h.to(dtype) / oh, oh, h)  # (K, oh)
    x_lo, x_hi = _bin_edges(corners[:, 0], roi_w.to(dtype) / ow, ow, w)  # (K, ow)
    batch = rois[:, 0].to(torch.int64)
    feat = _channels_last(input)
    bin_h = (y_hi - y_lo).amax(1).clamp(min=1)  # (K,) largest bin per RoI
    bin_w = (x_hi - x_lo).amax(1).clamp(min=1)
    for ids in _chunks(bin_h * bin_w, oh * ow * c, _GATHER_BUDGET):
        bh, bw = int(bin_h[ids].max()), int(bin_w[ids].max())
        ys = y_lo[ids, :, None] + torch.arange(bh, device=input.device)  # (k, oh, Bh)
        xs = x_lo[ids, :, None] + torch.arange(bw, device=input.device)  # (k, ow, Bw)
        in_y = ys < y_hi[ids, :, None]
        in_x = xs < x_hi[ids, :, None]
        ys, xs = ys.clamp(max=h - 1), xs.clamp(max=w - 1)  # padding taps: any valid pixel
        # (k, oh, 1, Bh, 1) and (k, 1, ow, 1, Bw) -> (k, oh, ow, Bh*Bw) spatial index in the image
        pos = (ys * w)[:, :, None, :, None] + xs[:, None, :, None, :]
        inside = in_y[:, :, None, :, None] & in_x[:, None, :, None, :]
        kk = ids.numel()
        pos = pos.reshape(kk, oh, ow, bh * bw)
        inside = inside.reshape(kk, oh, ow, bh * bw)
        flat = pos + (batch[ids] * (h * w))[:, None, None, None]
        vals = feat.index_select(0, flat.reshape(-1)).view(kk, oh, ow, bh * bw, c)
        vals = vals.masked_fill(~inside[..., None], float("-inf"))
        best, which = vals.max(dim=3)  # (k, oh, ow, C): first maximum, row-major window order
        empty = ~inside.any(3)  # (k, oh, ow)
        out.index_copy_(0, ids, best.masked_fill(empty[..., None], 0))
        arg_pos = torch.gather(pos, 3, which)
        arg.index_copy_(0, ids, arg_pos.masked_fill(empty[..., None], -1))
    return out.permute(0, 3, 1, 2).contiguous(), arg.permute(0, 3, 1, 2).contiguous()


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
    shape = (rois.shape[0], input.shape[1], output_size[0], output_size[1])
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


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
