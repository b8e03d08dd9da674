"""model/ops at every dtype they accept, autocast included, against the pure-torch references
(model/ops/reference.py) within torchvision's own tolerances (its test/test_ops.py: RoI ops
1e-5 in float32, 4e-3 in float16, 5e-3 in bfloat16; NMS keeps exactly float32's set)."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from model.ops import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    multiscale_roi_align,
    nms,
    remove_small_boxes,
    roi_align,
    roi_pool,
)
from model.ops.reference import batched_nms_reference, nms_reference, roi_align_reference

TOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 5e-3}
LOW = (torch.float16, torch.bfloat16)


def autocast_or_not(mode: str, dtype: torch.dtype):
    """'autocast': CPU autocast to dtype; 'plain': the op called with dtype tensors directly."""
    return torch.autocast("cpu", dtype=dtype) if mode == "autocast" else contextlib.nullcontext()


# --- RoIAlign -----------------------------------------------------------------------------------


def random_rois(g: torch.Generator, k: int, n: int, h: int, w: int) -> torch.Tensor:
    """(k, 5) RoIs in image pixels (features at spatial_scale 1/2), some past the border."""
    xy = torch.rand(k, 2, generator=g) * torch.tensor([2 * w, 2 * h]) - 4
    wh = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) + 0.5
    return torch.cat([torch.randint(0, n, (k, 1), generator=g).float(), xy, xy + wh], 1)


# autocast leaves float64 alone, and runs float32 input as it is (under bfloat16 autocast here)
@pytest.mark.parametrize(("mode", "dtype"), [
    ("plain", torch.float64), ("plain", torch.float32), ("plain", torch.float16), ("plain", torch.bfloat16),
    ("autocast", torch.float32), ("autocast", torch.float16), ("autocast", torch.bfloat16)], ids=str)
@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(2, False), (0, True), (0, False)])
def test_roi_align_equals_reference_at_every_dtype(mode, dtype, sampling_ratio, aligned):
    g = torch.Generator().manual_seed(sampling_ratio * 2 + aligned)
    x = torch.rand(2, 8, 19, 23, generator=g).to(dtype)
    rois = random_rois(g, 40, 2, 19, 23).to(dtype)
    with autocast_or_not(mode, dtype if dtype in LOW else torch.bfloat16):
        out = roi_align(x, rois, (5, 4), 0.5, sampling_ratio, aligned)
    assert out.dtype == dtype
    ref = roi_align_reference(x, rois, (5, 4), 0.5, sampling_ratio, aligned)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_torchvision_autocast_cpu_case(x_dtype, rois_dtype, aligned):
    # torchvision's TestRoIAlign.test_autocast_cpu: permuted (non-contiguous) input, 5x5 adaptive
    torch.manual_seed(0)
    x = torch.rand(2, 50, 10, 10, dtype=x_dtype).permute(0, 1, 3, 2)
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=rois_dtype)
    with torch.autocast("cpu"):
        y = roi_align(x, rois, 5, 1, -1, aligned)
    assert y.dtype == x_dtype
    tol = TOL[x_dtype]
    torch.testing.assert_close(y.double(), roi_align_reference(x, rois, (5, 5), 1, -1, aligned), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_roi_align_backward_under_autocast_is_float32_gradient_cast_back(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 4, 12, 14, generator=g).to(dtype).requires_grad_(True)
    rois = random_rois(g, 20, 2, 12, 14)
    grad = torch.rand(20, 4, 3, 3, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = roi_align(x, rois, 3, 0.5, 2, False)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert gx.dtype == dtype
    x64 = x.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(roi_align_reference(x64, rois, (3, 3), 0.5, 2, False), x64, grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(gx.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["plain", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_multiscale_roi_align_low_precision_equals_reference_per_level(mode, dtype):
    g = torch.Generator().manual_seed(4)
    scales = [1 / 4, 1 / 8, 1 / 16]
    feats = [torch.rand(1, 6, 256 // s, 320 // s, generator=g).to(dtype) for s in (4, 8, 16)]
    xy = torch.rand(30, 2, generator=g) * 200
    rois = torch.cat([torch.zeros(30, 1), xy, xy + 8 + torch.rand(30, 2, generator=g) * 250], 1).to(dtype)
    with autocast_or_not(mode, dtype):
        out = multiscale_roi_align(feats, rois, 7, scales, 2)
    assert out.dtype == dtype
    # levels from float32 areas of the RoIs' values (torchvision's LevelMapper upcasts)
    side = ((rois[:, 3].float() - rois[:, 1].float()) * (rois[:, 4].float() - rois[:, 2].float())).sqrt()
    level = (torch.floor(4 + torch.log2(side / 224) + 1e-6).clamp(2, 4) - 2).long()
    ref = torch.empty(30, 6, 7, 7, dtype=torch.float64)
    for lvl, (f, s) in enumerate(zip(feats, scales, strict=True)):
        idx = torch.where(level == lvl)[0]
        ref[idx] = roi_align_reference(f, rois[idx], (7, 7), s, 2, False)
    assert len(set(level.tolist())) == 3  # every level used
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["plain", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_roi_pool_low_precision_is_float32_result_cast_back(mode, dtype):
    # a max is exact in any dtype: only bin geometry could differ, and it is float32 too
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 5, 33, 41, generator=g).to(dtype)
    rois = random_rois(g, 25, 2, 66, 82).to(dtype)
    with autocast_or_not(mode, dtype):
        out = roi_pool(x, rois, (4, 3), 0.37)
    assert out.dtype == dtype
    assert torch.equal(out, roi_pool(x.float(), rois.float(), (4, 3), 0.37).to(dtype))


# --- NMS ----------------------------------------------------------------------------------------


def boxes_with_iou(n: int, iou: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's _create_tensors_with_iou: random boxes, the last one barely over `iou`
    with the first."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(n, 4, generator=g) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1] = boxes[0]
    x0, _, x1, _ = boxes[-1].tolist()
    t = iou + 1e-5
    boxes[-1, 2] += (x1 - x0) * (1 - t) / t
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("mode", ["plain", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
def test_nms_low_precision_keeps_float32_set(mode, dtype, iou):
    for seed in range(3):
        boxes, scores = boxes_with_iou(1000, iou, seed)
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        with autocast_or_not(mode, dtype):
            keep = nms(boxes, scores, iou)
        # the same values in float32: what torchvision's autocast kernel compares
        expected = nms(boxes.float(), scores.float(), iou)
        assert torch.equal(keep, expected), (seed, len(keep), len(expected))
        assert torch.equal(keep, nms_reference(boxes, scores, iou))


@pytest.mark.parametrize("mode", ["plain", "autocast"])
def test_batched_nms_bfloat16_keeps_float32_set(mode):
    g = torch.Generator().manual_seed(6)
    boxes, scores = boxes_with_iou(600, 0.5, 6)
    idxs = torch.randint(0, 4, (600,), generator=g)
    boxes, scores = boxes.bfloat16(), scores.bfloat16()
    with autocast_or_not(mode, torch.bfloat16):
        keep = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, batched_nms(boxes.float(), scores.float(), idxs, 0.5))
    assert torch.equal(keep, batched_nms_reference(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
def test_nms_equals_reference_seeded(dtype, iou):
    for seed in range(5):
        boxes, scores = boxes_with_iou(800, iou, 100 + seed)
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        assert torch.equal(nms(boxes, scores, iou), nms_reference(boxes, scores, iou))


def test_batched_nms_grouped_path_equals_reference_with_tied_scores():
    # > 2000 boxes takes the per-group loop; tied scores across groups must come out in index order
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(3000, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 10 + torch.rand(3000, 2, generator=g) * 40], 1)
    scores = torch.randint(0, 20, (3000,), generator=g).float() / 20  # many ties
    idxs = torch.randint(0, 5, (3000,), generator=g)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), batched_nms_reference(boxes, scores, idxs, 0.5))


# --- box utilities ------------------------------------------------------------------------------


def integer_boxes(dtype: torch.dtype) -> torch.Tensor:
    hi = min(torch.iinfo(dtype).max, 3000)  # areas exact in float32 (< 2**24)
    lo = max(torch.iinfo(dtype).min, -100)
    # wide boxes (a 100 x 100 area wraps in int8), boxes across 0, a degenerate one
    return torch.tensor([[0, 0, 100, 100], [lo, lo, hi, hi], [-5, 3, 20, 90], [7, 7, 7, 9]]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_integer_box_ops_equal_float32(dtype):
    boxes = integer_boxes(dtype)
    f = boxes.float()
    area = box_area(boxes)
    assert area.dtype == (torch.int64 if dtype == torch.int64 else torch.int32)
    assert area.tolist() == box_area(f).long().tolist()
    assert area[0] == 10000
    iou = box_iou(boxes, boxes.flip(0))
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, box_iou(f, f.flip(0)), equal_nan=True)
    assert remove_small_boxes(boxes, 10).tolist() == remove_small_boxes(f, 10).tolist()
    size = torch.tensor([300, 250])  # (h, w) beyond int8's range: must not wrap
    assert clip_boxes(boxes, size).tolist() == clip_boxes(f, size).to(dtype).tolist()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_box_ops_equal_float32_of_the_same_values(dtype):
    # boxes of 300-2000 px: float16 areas overflow to inf, IoUs were NaN
    g = torch.Generator().manual_seed(8)
    xy = torch.rand(50, 2, generator=g) * 1000
    boxes = torch.cat([xy, xy + 300 + torch.rand(50, 2, generator=g) * 1700], 1).to(dtype)
    f = boxes.float()
    area = box_area(boxes)
    assert area.dtype == torch.float32 and torch.isfinite(area).all()
    assert torch.equal(area, box_area(f))
    iou = box_iou(boxes, boxes[:20])
    assert iou.dtype == torch.float32 and not iou.isnan().any()
    assert torch.equal(iou, box_iou(f, f[:20]))
    assert remove_small_boxes(boxes, 500.0).tolist() == remove_small_boxes(f, 500.0).tolist()
    # clipped in the boxes' dtype, as torchvision: equal to float32's clip rounded to dtype
    size = torch.tensor([1200, 1500])
    assert torch.equal(clip_boxes(boxes, size), clip_boxes(f, size).to(dtype))


def test_box_area_gradient_reaches_float16_boxes():
    boxes = torch.tensor([[0.0, 0, 300, 400]], dtype=torch.float16, requires_grad=True)
    box_area(boxes).sum().backward()
    assert boxes.grad.dtype == torch.float16
    assert boxes.grad.tolist() == [[-400.0, -300.0, 400.0, 300.0]]


# --- autocast registration ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_autocast_kernels_registered_where_torchvision_has_them(key):
    # torchvision registers autocast kernels for nms, roi_align and roi_pool (batched_nms and
    # MultiScaleRoIAlign go through them); its box ops are plain Python that autocast leaves alone
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("nms", "batched_nms", "roi_align", "roi_pool", "multiscale_roi_align"):
        assert has(f"frcnn::{op}", key), op
    for op in ("box_area", "box_iou", "clip_boxes", "remove_small_boxes"):
        assert not has(f"frcnn::{op}", key), op


def test_autocast_runs_roi_align_in_float32_and_casts_back(monkeypatch):
    # through the autocast kernel the op sees float32 input *and* RoIs (torchvision's cached_cast
    # of both); called plainly with bfloat16 it upcasts only the features itself
    module = importlib.import_module("model.ops.roi_align")
    seen = []

    def spy(inp, r, *args, _real=module._forward):
        seen.append((inp.dtype, r.dtype))
        return _real(inp, r, *args)

    monkeypatch.setattr(module, "_forward", spy)
    x = torch.rand(1, 2, 6, 6, dtype=torch.bfloat16)
    rois = torch.tensor([[0, 0.3, 0.7, 4.9, 5.1]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(x, rois, 2, 1.0, 2, False)
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.float32, torch.float32)]
    roi_align(x, rois, 2, 1.0, 2, False)
    assert seen[1] == (torch.float32, torch.bfloat16)
