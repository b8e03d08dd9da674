"""torch.export keeps each model/ops op as one `frcnn::` node, with dynamic (and for NMS and
remove_small_boxes, data-dependent) sizes, and the exported program computes what eager does."""

from __future__ import annotations

import torch
from torch.export import Dim

from model.ops import (
    DECOMPOSITIONS,
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


def frcnn_ops(ep: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("frcnn.")}


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 30], 1)


class Postprocess(torch.nn.Module):
    """A miniature detection postprocess: every box op, NMS, then top boxes."""

    def forward(self, boxes, scores, labels, image_size):
        boxes = clip_boxes(boxes, image_size)
        keep = remove_small_boxes(boxes, 2.0)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, 0.5)
        first = nms(boxes, scores, 0.7)
        return boxes[keep], box_area(boxes[keep]), box_iou(boxes[keep], boxes[first])


def test_export_box_ops_and_nms_dynamic_n():
    n = Dim("n", min=2, max=10_000)
    args = (random_boxes(40, 0), torch.rand(40), torch.randint(0, 3, (40,)), torch.tensor([40, 45]))
    ep = torch.export.export(Postprocess(), args,
                             dynamic_shapes=({0: n}, {0: n}, {0: n}, None))
    assert frcnn_ops(ep) == {"frcnn.clip_boxes.default", "frcnn.remove_small_boxes.default",
                             "frcnn.batched_nms.default", "frcnn.nms.default",
                             "frcnn.box_area.default", "frcnn.box_iou.default"}
    other = (random_boxes(300, 1), torch.rand(300), torch.randint(0, 3, (300,)), torch.tensor([60, 50]))
    for got, want in zip(ep.module()(*other), Postprocess()(*other), strict=True):
        assert torch.equal(got, want)


class Pool(torch.nn.Module):
    def forward(self, p2, p3, rois):
        a = roi_align(p2, rois, (7, 7), 0.25, 2, False)
        b = roi_pool(p3, rois, (3, 3), 0.125)
        c = multiscale_roi_align([p2, p3], rois, (7, 7), [0.25, 0.125], 2)
        return a, b, c


def test_export_roi_ops_dynamic_batch_size_and_rois():
    b, k = Dim("b", min=1, max=8), Dim("k", min=1, max=4096)
    h, w = Dim("h", min=2, max=512), Dim("w", min=2, max=512)

    def inputs(batch, hh, ww, n, seed):
        g = torch.Generator().manual_seed(seed)
        rois = torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), random_boxes(n, seed)], 1)
        return (torch.randn(batch, 4, 4 * hh, 4 * ww, generator=g),
                torch.randn(batch, 4, 2 * hh, 2 * ww, generator=g), rois)

    # P3 is half of P2: expressed as P2 = 2 * (2h), P3 = 2h so that both stay consistent
    ep = torch.export.export(Pool(), inputs(2, 8, 9, 16, 0),
                             dynamic_shapes=({0: b, 2: 4 * h, 3: 4 * w}, {0: b, 2: 2 * h, 3: 2 * w}, {0: k}))
    assert frcnn_ops(ep) == {"frcnn.roi_align.default", "frcnn.roi_pool.default",
                             "frcnn.multiscale_roi_align.default"}
    other = inputs(3, 5, 12, 40, 1)
    for got, want in zip(ep.module()(*other), Pool()(*other), strict=True):
        assert torch.equal(got, want)


def test_box_op_decompositions_give_plain_aten():
    ep = torch.export.export(Postprocess(), (random_boxes(40, 0), torch.rand(40), torch.randint(0, 3, (40,)),
                                             torch.tensor([40, 45])))
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    dec = ep.run_decompositions(table)
    assert frcnn_ops(dec) == {"frcnn.remove_small_boxes.default", "frcnn.batched_nms.default",
                              "frcnn.nms.default"}
    args = (random_boxes(40, 2), torch.rand(40), torch.randint(0, 3, (40,)), torch.tensor([30, 45]))
    for got, want in zip(dec.module()(*args), Postprocess()(*args), strict=True):
        assert torch.equal(got, want)
