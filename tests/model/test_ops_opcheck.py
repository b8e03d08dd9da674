"""torch.library.opcheck on every frcnn op at every dtype it supports: schema, fake
implementation (output shapes and dtypes, e.g. box_area's int32 for int8 boxes), autograd
registration and AOT dispatch agree with the real kernels."""

from __future__ import annotations

import pytest
import torch

import model.ops  # noqa: F401  (registers torch.ops.frcnn)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]


def boxes(dtype: torch.dtype, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 60
    return torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 60], 1).to(dtype)


def features(dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 10, 12, generator=g).to(dtype).requires_grad_(grad)
    rois = torch.tensor([[0, 0, 0, 9, 9], [1, 2.5, 2, 5, 7], [0, 4, 1, 11, 8]]).to(dtype)
    return x, rois


def check(op, args) -> None:
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("dtype", FLOATS + INTS, ids=str)
def test_box_ops_opcheck(dtype):
    b = boxes(dtype)
    ops = torch.ops.frcnn
    check(ops.box_area.default, (b,))
    check(ops.box_iou.default, (b, b[:5]))
    check(ops.clip_boxes.default, (b, torch.tensor([40, 50])))
    check(ops.remove_small_boxes.default, (b, 20.0))
    if dtype.is_floating_point and dtype != torch.float64:  # gradients through the upcast
        check(ops.box_area.default, (b.requires_grad_(True),))


@pytest.mark.parametrize("dtype", FLOATS + [torch.int32], ids=str)
def test_nms_opcheck(dtype):
    b = boxes(dtype, 40)
    scores = torch.rand(40, generator=torch.Generator().manual_seed(2)).to(dtype if dtype.is_floating_point else torch.float32)
    check(torch.ops.frcnn.nms.default, (b, scores, 0.5))
    check(torch.ops.frcnn.batched_nms.default, (b, scores, torch.arange(40) % 3, 0.5))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("grad", [False, True])
def test_roi_ops_opcheck(dtype, grad):
    x, rois = features(dtype, grad)
    ops = torch.ops.frcnn
    check(ops.roi_align.default, (x, rois, [3, 2], 1.0, 2, False))
    check(ops.roi_align.default, (x, rois, [2, 2], 0.5, 0, True))
    check(ops.roi_pool.default, (x, rois, [3, 3], 1.0))
    small = torch.rand(2, 3, 5, 6).to(dtype).requires_grad_(grad)
    check(ops.multiscale_roi_align.default, ([x, small], rois, [2, 2], [1 / 4, 1 / 8], 2, 224, 4, False))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_backward_ops_opcheck(dtype):
    _, rois = features(dtype, False)
    grad = torch.rand(3, 3, 2, 2).to(dtype)
    ops = torch.ops.frcnn
    check(ops.roi_align_backward.default, (grad, rois, [2, 3, 10, 12], [2, 2], 1.0, 2, False))
    check(ops.multiscale_roi_align_backward.default,
          (grad, rois, [2, 3, 10, 12, 2, 3, 5, 6], [2, 2], [1 / 4, 1 / 8], 2, 224, 4, False))
    argmax = torch.randint(0, 120, (3, 3, 2, 2))
    check(ops.roi_pool_backward.default, (grad, argmax, rois, [2, 3, 10, 12]))
