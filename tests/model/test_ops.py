"""model/ops box utilities and NMS: hand-computed values, properties, a naive greedy reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from model.ops import batched_nms, box_area, box_iou, clip_boxes, nms, remove_small_boxes

# the module, not the function model.ops.nms that shadows it as a package attribute
nms_module = importlib.import_module("model.ops.nms")


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """The textbook loop, one box at a time: the reference the vectorised NMS must equal."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= box_iou(boxes[i:i + 1], boxes)[0] > thr
    return torch.tensor(keep, dtype=torch.int64)


def clustered(n: int, seed: int, clusters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(clusters, 2, generator=g) * 300
    which = torch.randint(0, clusters, (n,), generator=g)
    c = ctr[which] + torch.randn(n, 2, generator=g) * 8
    s = 20 * torch.exp(torch.randn(n, 2, generator=g) * 0.3)
    return torch.cat([c - s / 2, c + s / 2], 1), torch.rand(n, generator=g)


# --- box utilities ------------------------------------------------------------------------------


def test_box_area_and_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])
    b = torch.tensor([[1.0, 1, 11, 11], [20, 20, 30, 30]])
    assert box_area(a).tolist() == [100.0, 50.0]
    iou = box_iou(a, b)
    # 9x9 = 81 shared of 100 + 100 - 81; a 9x4 = 36 overlap of 50 + 100 - 36; disjoint -> 0
    torch.testing.assert_close(iou, torch.tensor([[81 / 119, 0.0], [36 / 114, 0.0]]))


def test_box_iou_integer_boxes_give_float():
    a = torch.tensor([[0, 0, 2, 2]])
    iou = box_iou(a, torch.tensor([[1, 1, 3, 3], [0, 0, 2, 2]]))
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0]]))


def test_box_iou_empty_shapes():
    assert box_iou(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)


def test_clip_boxes_broadcasts_image_size():
    boxes = torch.tensor([[[-5.0, -1, 50, 40], [3, 4, 5, 6]], [[10, 10, 200, 300], [-1, -1, -1, -1]]])
    sizes = torch.tensor([[[30, 40]], [[100, 150]]])  # (h, w) per row: (2, 1, 2) against (2, 2, 4)
    out = clip_boxes(boxes, sizes)
    assert out.tolist() == [[[0, 0, 40, 30], [3, 4, 5, 6]], [[10, 10, 150, 100], [0, 0, 0, 0]]]


def test_clip_boxes_gradient_flows_inside_only():
    boxes = torch.tensor([[-5.0, 2, 50, 8]], requires_grad=True)
    clip_boxes(boxes, torch.tensor([10, 40])).sum().backward()
    assert boxes.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_remove_small_boxes_keeps_both_sides_at_least_min():
    boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 0.5, 2], [0, 0, 2, 0.99], [5, 5, 7, 8]])
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 3]
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).shape == (0,)


# --- nms ----------------------------------------------------------------------------------------

FOUR = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]])
FOUR_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.95])


def test_nms_four_boxes_by_hand():
    # order 3, 0, 1, 2. IoU(3, 0) = 0.5 exactly, IoU(0, 1) = 0.68, IoU(3, 1) = 0.32.
    # thr 0.5: 0.5 is not > 0.5 so box 0 survives and suppresses 1.
    assert nms(FOUR, FOUR_SCORES, 0.5).tolist() == [3, 0, 2]
    # thr 0.4: box 3 suppresses 0; a suppressed box suppresses nothing, so 1 survives.
    assert nms(FOUR, FOUR_SCORES, 0.4).tolist() == [3, 1, 2]


def test_nms_empty_and_integer_inputs():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    assert nms(FOUR.to(torch.int64), FOUR_SCORES, 0.5).tolist() == [3, 0, 2]


def test_nms_threshold_compared_like_torchvision_in_double():
    # IoU of these boxes is 0.3 in float32 (rounds up to 0.300000012); float(0.3) is above 0.3, so
    # torchvision (float IoU > double 0.3) suppresses; a float32 comparison would not.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 3]])
    iou = box_iou(boxes[:1], boxes[1:]).item()
    assert iou > 0.3
    assert nms(boxes, torch.tensor([1.0, 0.5]), 0.3).tolist() == [0]


@pytest.mark.parametrize("tile", [8, 256])
def test_nms_equals_greedy_reference(monkeypatch, tile):
    monkeypatch.setattr(nms_module, "_TILE", tile)  # small tiles: many tiles, chains across them
    boxes, scores = clustered(600, seed=tile)
    for thr in (0.3, 0.7):
        assert torch.equal(nms(boxes, scores, thr), greedy_nms(boxes, scores, thr))


def test_nms_ties_keep_original_order():
    boxes = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1]])
    assert nms(boxes, torch.ones(3), 0.5).tolist() == [0, 1]


def test_nms_float64_and_long_chain():
    # each box overlaps only its neighbours: greedy keeps every other box
    x = torch.arange(40, dtype=torch.float64) * 4
    boxes = torch.stack([x, torch.zeros_like(x), x + 10, torch.ones_like(x) * 10], 1)
    scores = torch.linspace(1, 0.1, 40, dtype=torch.float64)
    assert torch.equal(nms(boxes, scores, 0.5), greedy_nms(boxes, scores, 0.5))


def test_batched_nms_is_nms_per_class():
    boxes, scores = clustered(500, seed=3)
    idxs = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(4))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = torch.cat([torch.where(idxs == c)[0][nms(boxes[idxs == c], scores[idxs == c], 0.5)]
                          for c in range(4)])
    expected = expected[torch.sort(scores[expected], descending=True).indices]
    assert torch.equal(keep, expected)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])


def test_batched_nms_identical_boxes_other_class_survive():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 1]), 0.5)
    assert keep.tolist() == [0, 1]
