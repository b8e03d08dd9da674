"""model/ops RoIAlign, RoIPool and multi-scale RoIAlign: hand grids, properties, gradcheck."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from model.ops import map_levels, multiscale_roi_align, roi_align, roi_pool

# A 5x5 map with value 5 * y + x: bilinear interpolation of a linear function is exact, so every
# in-range sample equals 5 * y + x and a bin is 5 * mean(y) + mean(x).
RAMP = (5 * torch.arange(5.0)[:, None] + torch.arange(5.0)[None, :]).view(1, 1, 5, 5)


def test_roi_align_5x5_by_hand():
    rois = torch.tensor([[0.0, 1, 1, 3, 3]])
    # not aligned: RoI [1, 3], bins of 1 px, samples at 1.25, 1.75 | 2.25, 2.75 -> means 1.5 | 2.5
    out = roi_align(RAMP, rois, (2, 2), 1.0, 2, aligned=False)
    assert out.view(2, 2).tolist() == [[9.0, 10.0], [14.0, 15.0]]
    # aligned: shifted by -0.5 -> means 1.0 | 2.0
    out = roi_align(RAMP, rois, (2, 2), 1.0, 2, aligned=True)
    assert out.view(2, 2).tolist() == [[6.0, 7.0], [11.0, 12.0]]
    # adaptive: ceil(2 / 2) = 1 sample per bin, at the bin centres 1.5 | 2.5
    out = roi_align(RAMP, rois, (2, 2), 1.0, 0, aligned=False)
    assert out.view(2, 2).tolist() == [[9.0, 10.0], [14.0, 15.0]]


def test_roi_align_samples_outside_count_as_zero():
    # RoI [3, 6]^2, one bin, 2x2 samples at 3.75 and 5.25; 5.25 > H = 5 is outside, contributes 0
    # but still counts: (5 * 3.75 + 3.75) / 4
    out = roi_align(RAMP, torch.tensor([[0.0, 3, 3, 6, 6]]), (1, 1), 1.0, 2, aligned=False)
    assert out.item() == pytest.approx(22.5 / 4)


def test_roi_align_clamps_to_last_pixel():
    # samples at 4.25 and 4.75 lie in (H - 1, H]: clamped to row/column 4 -> value 24
    out = roi_align(RAMP, torch.tensor([[0.0, 4, 4, 5, 5]]), (1, 1), 1.0, 2, aligned=False)
    assert out.item() == 24.0


def test_roi_align_spatial_scale_and_batch_index():
    feats = torch.cat([RAMP, 100 + RAMP])
    a = roi_align(feats, torch.tensor([[1.0, 2, 2, 6, 6]]), (2, 2), 0.5, 2)
    b = roi_align(feats[1:], torch.tensor([[0.0, 1, 1, 3, 3]]), (2, 2), 1.0, 2)
    assert torch.equal(a, b) and a.view(-1).tolist() == [109.0, 110.0, 114.0, 115.0]


def test_roi_align_empty_inputs_and_channels_last():
    x = torch.randn(2, 3, 6, 7)
    assert roi_align(x, torch.zeros(0, 5), (2, 2), 1.0, 2).shape == (0, 3, 2, 2)
    rois = torch.tensor([[1.0, 0.5, 1, 4, 5], [0, 2, 0, 6, 3]])
    ref = roi_align(x, rois, (3, 2), 1.0, 0, True)
    cl = roi_align(x.contiguous(memory_format=torch.channels_last), rois, (3, 2), 1.0, 0, True)
    torch.testing.assert_close(cl, ref, rtol=0, atol=0)


def test_roi_align_adaptive_grids_chunked(monkeypatch):
    # tiny tap budget: every RoI its own chunk with its own grid; results must not change
    x = torch.randn(1, 4, 20, 20)
    rois = torch.tensor([[0.0, 0, 0, 19, 19], [0, 2, 3, 4, 5], [0, 5, 5, 15, 9], [0, 1, 1, 1.2, 1.2]])
    ref = roi_align(x, rois, (3, 3), 1.0, 0, False)
    module = importlib.import_module("model.ops.roi_align")
    monkeypatch.setattr(module, "_TAP_BUDGET", 1)
    torch.testing.assert_close(roi_align(x, rois, (3, 3), 1.0, 0, False), ref)


def naive_roi_align(x, rois, out_hw, scale, sampling_ratio, aligned):
    """torchvision's RoIAlign written out sample by sample with Python scalars (slow, obvious)."""
    _, c, h, w = x.shape
    oh, ow = out_hw
    out = torch.zeros(len(rois), c, oh, ow, dtype=x.dtype)
    off = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gy = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gx = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        for ph, pw, iy, ix in itertools.product(range(oh), range(ow), range(gy), range(gx)):
            y = sy + ph * rh / oh + (iy + 0.5) * rh / oh / gy
            xx = sx + pw * rw / ow + (ix + 0.5) * rw / ow / gx
            if y < -1 or y > h or xx < -1 or xx > w:
                continue
            y, xx = min(max(y, 0.0), h - 1), min(max(xx, 0.0), w - 1)
            y0, x0 = int(y), int(xx)
            y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ly, lx = y - y0, xx - x0
            img = x[int(b)]
            v = ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1_]
                 + ly * (1 - lx) * img[:, y1_, x0] + ly * lx * img[:, y1_, x1_])
            out[r, :, ph, pw] += v / max(gy * gx, 1)
    return out


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(0, False), (0, True), (3, False)])
def test_roi_align_equals_naive_reference_large_grids(sampling_ratio, aligned):
    # large RoIs on a small output: adaptive grids of up to 9 samples per bin side, so the
    # per-bin merging of taps that share a pixel is exercised (and the edge/outside rules)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 13, 17, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 0, 0, 16, 12], [1, -3, 2, 20, 9.5], [0, 3.3, 4.1, 5, 6], [1, 10, 1, 30, 30]],
                        dtype=torch.float64)
    out = roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(out, naive_roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned))


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(2, False), (0, True)])
def test_roi_align_gradcheck(sampling_ratio, aligned):
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1, 5, 4], [1, -1, 2, 3, 7], [0, 4, 4, 9, 9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned), (x,),
                                    fast_mode=True)


# --- roi_pool -----------------------------------------------------------------------------------


def test_roi_pool_5x5_by_hand():
    # RoI [1, 3] rounds to pixels 1..3 (3 px, end inclusive); 2 bins: [floor(0), ceil(1.5)) = 1..2,
    # [floor(1.5), ceil(3)) = 2..3 from the start; the max of a ramp is its bottom-right pixel
    out = roi_pool(RAMP, torch.tensor([[0.0, 1, 1, 3, 3]]), (2, 2), 1.0)
    assert out.view(2, 2).tolist() == [[12.0, 13.0], [17.0, 18.0]]
    # rounding is half away from zero (2.5 -> 3): RoI 3..4 at scale 0.5 of [5, 9]
    out = roi_pool(RAMP, torch.tensor([[0.0, 5, 5, 9, 9]]), (1, 1), 0.5)
    assert out.item() == 24.0


def test_roi_pool_empty_bin_is_zero_and_gradient_routes_to_max():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 3.0
    x.requires_grad_(True)
    # RoI entirely beyond the map: every bin clipped to empty -> 0, no gradient
    rois = torch.tensor([[0.0, 0, 0, 3, 3], [0, 10, 10, 12, 12]])
    out = roi_pool(x, rois, (1, 1), 1.0)
    assert out.view(-1).tolist() == [3.0, 0.0]
    out.sum().backward()
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 2] = 1.0
    assert torch.equal(x.grad, expected)


def test_roi_pool_gradcheck():
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 5, 6], [0, 2, 1, 4, 3]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 2), 1.0), (x,), fast_mode=True)


def _pool_paths(x, rois, size, scale):
    """(crops, gather): the op's outputs with its crop path on, and every RoI gathered; and how
    many RoIs the crop path took."""
    mod = importlib.import_module("model.ops.roi_pool")  # model.ops.roi_pool is the function
    taken = []
    real = mod._pool_crops

    def counting(input, ids, *args):
        taken.append(ids.numel())
        return real(input, ids, *args)

    mod._pool_crops = counting
    try:
        crops = mod._forward(x, rois, size, scale)
    finally:
        mod._pool_crops = real
    return crops, mod._forward(x, rois, size, scale, crops=False), sum(taken)


@pytest.mark.parametrize("size", [(7, 7), (2, 3), (1, 1), (6, 4)])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_roi_pool_crop_path_equals_gather_path(size, scale, dtype):
    # Few distinct values: bins tie often, so the first maximum in row-major order is tested, not
    # just the max. RoIs anywhere from 4 px before the map to 4 px past it: inside, within the
    # crop path's margin (bins wholly past the map are empty), and beyond it (gathered).
    # bfloat16 holds 0, 1, 2 exactly.
    g = torch.Generator().manual_seed(int(scale * 100) + size[0])
    n, c, h, w = 2, 5, 11, 13
    x = torch.randint(0, 3, (n, c, h, w), generator=g).to(dtype)
    k = 120
    x1 = torch.randint(-4, w + 2, (k,), generator=g)
    y1 = torch.randint(-4, h + 2, (k,), generator=g)
    x2 = x1 + torch.randint(-1, w // 2, (k,), generator=g)
    y2 = y1 + torch.randint(-1, h // 2, (k,), generator=g)
    rois = torch.stack([torch.randint(0, n, (k,), generator=g), x1, y1, x2, y2], 1).float()
    rois[:, 1:] /= scale
    (out, arg), (ref, ref_arg), taken = _pool_paths(x, rois, size, scale)
    assert k // 3 < taken < k  # both paths ran
    assert torch.equal(out, ref) and torch.equal(arg, ref_arg)
    assert (arg == -1).any() and (out[arg == -1] == 0).all()  # empty bins came up, as 0 and -1
    assert out.dtype == dtype and arg.dtype == torch.int32


def test_roi_pool_crop_path_gives_the_gradient_of_the_gather_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (1, 3, 9, 10), generator=g).double()
    rois = torch.tensor([[0, 0, 0, 9, 8], [0, 2, 1, 10, 9], [0, 3, 3, 5, 4], [0, -1, 2, 6, 7]], dtype=torch.float64)
    (_, arg), (_, ref_arg), taken = _pool_paths(x, rois, (3, 3), 1.0)
    assert taken == 4 and torch.equal(arg, ref_arg)
    x.requires_grad_(True)
    roi_pool(x, rois, (3, 3), 1.0).sum().backward()
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (3, 3), 1.0), (torch.randn_like(x, requires_grad=True),),
                                    fast_mode=True)
    assert x.grad.sum() == 4 * 3 * 9  # each bin's gradient landed on one pixel


def test_roi_pool_bins_float32_pushes_past_the_roi_are_torchvisions():
    # 57 px into 7 bins: torchvision's float32 bin size 57 / 7 times 7 rounds to 57.000004, so the
    # last bin ends at ceil(...) = 58, one pixel past the RoI. Adaptive pooling of the 57 px crop
    # would stop at 57: such a RoI must take the gather, and see the pixel just past its end.
    x = torch.zeros(1, 1, 1, 60)
    x[0, 0, 0, 57] = 5.0
    rois = torch.tensor([[0.0, 0, 0, 56, 0]])  # columns 0..56
    (out, arg), _, taken = _pool_paths(x, rois, (1, 7), 1.0)
    assert taken == 0
    assert out[0, 0, 0, -1].item() == 5.0 and arg[0, 0, 0, -1].item() == 57


def test_roi_pool_nonfinite_input_takes_the_gather():
    x = torch.zeros(1, 2, 6, 6)
    x[0, 0, 1, 1] = float("inf")
    x[0, 1] = float("-inf")
    rois = torch.tensor([[0.0, 0, 0, 5, 5]])
    (out, arg), (ref, ref_arg), taken = _pool_paths(x, rois, (2, 2), 1.0)
    assert taken == 0 and torch.equal(out, ref) and torch.equal(arg, ref_arg)
    assert out[0, 0, 0, 0].item() == float("inf") and arg[0, 0, 0, 0].item() == 7
    assert (out[0, 1] == float("-inf")).all()  # a bin of -inf pixels is -inf, at its first pixel
    assert arg[0, 1].flatten().tolist() == [0, 3, 18, 21]


# --- multiscale_roi_align ----------------------------------------------------------------------

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_map_levels_fpn_rule():
    # sqrt(area) 224 -> level 4 (index 2); 112 -> 3; 448 -> 5; tiny -> clamped to 2; huge -> 5
    sides = torch.tensor([224.0, 112, 448, 10, 3000, 223])
    rois = torch.stack([torch.zeros(6), torch.zeros(6), torch.zeros(6), sides, sides], 1)
    assert map_levels(rois, SCALES).tolist() == [2, 1, 3, 0, 3, 1]


def test_multiscale_equals_roi_align_on_the_mapped_level():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 3, 256 >> lvl, 320 >> lvl, generator=g) for lvl in range(2, 6)]
    xy = torch.rand(12, 2, generator=g) * 150
    side = torch.tensor([20.0, 150, 300, 500] * 3)[:, None]  # levels 2, 3, 4, 5
    rois = torch.cat([torch.tensor([0.0, 1] * 6)[:, None], xy, xy + side], 1)
    out = multiscale_roi_align(feats, rois, 7, SCALES, 2)
    levels = map_levels(rois, SCALES)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for i in range(rois.shape[0]):
        lvl = int(levels[i])
        torch.testing.assert_close(out[i:i + 1], roi_align(feats[lvl], rois[i:i + 1], 7, SCALES[lvl], 2))


def test_multiscale_gradcheck_all_levels():
    feats = [torch.randn(1, 2, 32 >> lvl, 32 >> lvl, dtype=torch.float64, requires_grad=True)
             for lvl in range(2, 4)]
    # canonical_scale 64: sqrt(area) 8 -> level 1, clamped to 2; 32 -> level 3
    rois = torch.tensor([[0, 2, 2, 10, 10], [0, 0, 0, 32, 32], [0, 5, 14, 13, 22]], dtype=torch.float64)
    assert map_levels(rois, [1 / 4, 1 / 8], canonical_scale=64).tolist() == [0, 1, 0]
    assert torch.autograd.gradcheck(
        lambda a, b: multiscale_roi_align([a, b], rois, 2, [1 / 4, 1 / 8], 2, canonical_scale=64),
        tuple(feats), fast_mode=True)
