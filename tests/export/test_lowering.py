"""Each frcnn op lowering (export/lowering.py), run by onnxruntime, against the eager op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import model.ops  # noqa: F401  (registers torch.ops.frcnn)
from export.lowering import translation_table
from export.tensorrt_ops import tensorrt_problems

ort = pytest.importorskip("onnxruntime")
Dim = torch.export.Dim


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes=None) -> onnx.ModelProto:
    """`module` exported with the frcnn lowerings, checked: standard ops only, TensorRT-parseable."""
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    prog = torch.onnx.export(ep, dynamo=True, custom_translation_table=translation_table(), opset_version=18,
                             verbose=False)
    proto = prog.model_proto
    assert not [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")], "custom op left in the graph"
    assert [p for p in tensorrt_problems(proto) if not p.startswith("MaxRoiPool")] == []
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _run_proto(proto: onnx.ModelProto, feeds: tuple) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feeds, strict=True)})


def _run_onnx(module: torch.nn.Module, args: tuple, dynamic_shapes=None, feeds: tuple | None = None):
    """Export `module` with the frcnn lowerings; run it in onnxruntime on `feeds` (default: args)."""
    return _run_proto(_export(module, args, dynamic_shapes), args if feeds is None else feeds)


def _random_boxes(n: int, size: float, g: torch.Generator, max_side: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) ** 2 * max_side + 0.2
    return torch.cat([xy, xy + wh], 1)


def _rois(n: int, batch: int, size: float, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, batch, (n, 1), generator=g).float()
    return torch.cat([idx, _random_boxes(n, size, g, max_side=size)], 1)


class _RoIAlignVariants(torch.nn.Module):
    def forward(self, x, rois):
        return tuple(torch.ops.frcnn.roi_align(x, rois, [7, 5], 0.125, sr, aligned)
                     for aligned in (False, True) for sr in (0, 2))


def test_roi_align_matches_eager_all_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 24, 40, generator=g)
    rois = _rois(64, 2, 250.0, g)
    dyn = ({0: Dim("N"), 2: Dim("H"), 3: Dim("W")}, {0: Dim("K")})
    got = _run_onnx(_RoIAlignVariants(), (x, rois), dyn)
    want = _RoIAlignVariants()(x, rois)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)
    # another feature size and RoI count through the same graph
    x2, rois2 = torch.randn(1, 8, 17, 9, generator=g), _rois(5, 1, 100.0, g)
    got = _run_onnx(_RoIAlignVariants(), (x, rois), dyn, feeds=(x2, rois2))
    for a, b in zip(got, _RoIAlignVariants()(x2, rois2), strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


class _MultiScale(torch.nn.Module):
    def __init__(self, scales):
        super().__init__()
        self.scales = scales

    def forward(self, rois, *features):
        return torch.ops.frcnn.multiscale_roi_align(list(features), rois, [7, 7], self.scales, 2, 224, 4, False)


@pytest.mark.parametrize("scales", [[1 / 4, 1 / 8, 1 / 16, 1 / 32], [1 / 32, 1 / 32]], ids=["fpn", "mobilenet"])
def test_multiscale_roi_align_matches_eager(scales):
    g = torch.Generator().manual_seed(1)
    h, w = 320, 448
    feats = tuple(torch.randn(2, 4, int(h * s), int(w * s), generator=g) for s in scales)
    rois = _rois(200, 2, 400.0, g)  # sides 0.2 .. 400 px: every level gets RoIs
    rois[:3, 3:] = rois[:3, 1:3]  # zero-area RoIs map to the first level
    module = _MultiScale(scales)
    got, = _run_onnx(module, (rois, *feats))
    np.testing.assert_allclose(got, module(rois, *feats).numpy(), rtol=1e-5, atol=1e-5)


def test_multiscale_roi_align_locality_order_changes_nothing_and_tensorrt_form_drops_it():
    """The RoIs are pooled in image/top-edge order (export/lowering.locality_order: a speed-only
    ascending TopK) and written back in RoI order; TensorRT's form replaces that sort with the
    identity. Both give the eager op's rows, bit-equal to each other, at 0, 1 and many RoIs."""
    from export.tensorrt_ops import tensorrt_ready

    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    g = torch.Generator().manual_seed(3)
    feats = tuple(torch.randn(2, 4, int(256 * s), int(320 * s), generator=g) for s in scales)
    module = _MultiScale(scales)
    rois = _rois(300, 2, 300.0, g)
    proto = _export(module, (rois, *feats), ({0: Dim("K")}, (None,) * len(feats)))
    sorts = [n for n in proto.graph.node if n.op_type == "TopK"]
    assert len(sorts) == 1 and [a.i for a in sorts[0].attribute if a.name == "largest"] == [0]
    trt = tensorrt_ready(proto)
    assert not [n for n in trt.graph.node if n.op_type == "TopK"] and tensorrt_problems(trt) == []
    for k in (300, 1, 0):
        sorted_rows, = _run_proto(proto, (rois[:k], *feats))
        plain_rows, = _run_proto(trt, (rois[:k], *feats))
        assert sorted_rows.shape == (k, 4, 7, 7)
        np.testing.assert_array_equal(sorted_rows, plain_rows)
        np.testing.assert_allclose(sorted_rows, module(rois[:k], *feats).numpy(), rtol=1e-5, atol=1e-5)


def test_fpn_level_of_canonical_sizes():
    """A 224 x 224 RoI pools from level 4 (index 2 of P2..P5); 112 from 3; 448 from 5; 8 from 2."""
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = tuple(torch.full((1, 1, 64, 64), float(level)) for level in range(4))  # map l is constant l
    rois = torch.tensor([[0, 0, 0, 224, 224], [0, 0, 0, 112, 112], [0, 0, 0, 448, 448], [0, 0, 0, 8, 8.0]])
    got, = _run_onnx(_MultiScale(scales), (rois, *feats))
    assert got[:, 0, 3, 3].tolist() == [2.0, 1.0, 3.0, 0.0]


class _Nms(torch.nn.Module):
    def forward(self, boxes, scores, idxs):
        return torch.ops.frcnn.nms(boxes, scores, 0.5), torch.ops.frcnn.batched_nms(boxes, scores, idxs, 0.7)


def test_nms_and_batched_nms_match_eager_in_order():
    g = torch.Generator().manual_seed(2)
    boxes = _random_boxes(500, 300.0, g, max_side=80.0)
    scores = torch.rand(500, generator=g)
    idxs = torch.randint(0, 7, (500,), generator=g) * 3  # sparse group ids
    dyn = ({0: Dim("N")}, {0: Dim("N")}, {0: Dim("N")})
    got = _run_onnx(_Nms(), (boxes, scores, idxs), dyn)
    for a, b in zip(got, _Nms()(boxes, scores, idxs), strict=True):
        assert a.tolist() == b.tolist()  # same indices, same (decreasing score) order
    # and with no boxes at all
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    got = _run_onnx(_Nms(), (boxes, scores, idxs), dyn, feeds=empty)
    assert [a.shape for a in got] == [(0,), (0,)]


class _NmsByImage(torch.nn.Module):
    def forward(self, boxes, scores, idxs):
        from export.wrappers import batched_nms_by_image

        return batched_nms_by_image(boxes, scores, idxs, 5, 0.7)


def test_batched_nms_by_image_puts_images_on_the_nms_batch_dimension():
    """Images (idxs // 5) as NonMaxSuppression batch items: the same kept set as frcnn::batched_nms,
    image by image, each in decreasing score; an image without boxes in between, and no boxes at all."""
    g = torch.Generator().manual_seed(5)
    boxes = _random_boxes(600, 300.0, g, max_side=80.0)
    scores = torch.rand(600, generator=g)
    image = torch.tensor([0] * 250 + [2] * 200 + [3] * 150)  # image 1 has no boxes
    idxs = image * 5 + torch.randint(0, 5, (600,), generator=g)
    dyn = ({0: Dim("N")}, {0: Dim("N")}, {0: Dim("N")})
    got, = _run_onnx(_NmsByImage(), (boxes, scores, idxs), dyn)
    want = torch.ops.frcnn.batched_nms(boxes, scores, idxs, 0.7)
    assert sorted(got.tolist()) == sorted(want.tolist())
    got = torch.from_numpy(got)
    assert torch.equal(image[got], image[got].sort().values)  # image by image
    for i in (0, 2, 3):
        mine = got[image[got] == i]
        assert torch.equal(mine, want[image[want] == i])  # each image in eager's (score) order
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    got, = _run_onnx(_NmsByImage(), (boxes, scores, idxs), dyn, feeds=empty)
    assert got.shape == (0,)


class _BoxOps(torch.nn.Module):
    def forward(self, boxes, other, sizes):
        return (torch.ops.frcnn.box_area(boxes), torch.ops.frcnn.box_iou(boxes, other),
                torch.ops.frcnn.clip_boxes(boxes, sizes), torch.ops.frcnn.remove_small_boxes(boxes, 4.0))


def test_box_ops_match_eager():
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(40, 100.0, g, max_side=30.0) - 10  # some outside the image
    other = _random_boxes(9, 100.0, g, max_side=30.0)
    sizes = torch.tensor([[60, 80]]).expand(40, 2).contiguous()  # (h, w) per box
    dyn = ({0: Dim("N")}, {0: Dim("M")}, {0: Dim("N")})
    got = _run_onnx(_BoxOps(), (boxes, other, sizes), dyn)
    for a, b in zip(got, _BoxOps()(boxes, other, sizes), strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-5)


class _RoIPool(torch.nn.Module):
    def forward(self, x, rois):
        return torch.ops.frcnn.roi_pool(x, rois, [7, 7], 1 / 16)[0]


def test_roi_pool_matches_eager():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 20, 30, generator=g)
    rois = _rois(50, 2, 400.0, g)
    got, = _run_onnx(_RoIPool(), (x, rois), ({0: Dim("N")}, {0: Dim("K")}))
    np.testing.assert_allclose(got, _RoIPool()(x, rois).numpy(), rtol=1e-6, atol=1e-6)


def test_multiscale_roi_align_channel_blocks_are_bit_equal_to_one_pass(monkeypatch):
    """Pooling a level's channels block after block (export/lowering.ROI_CHANNEL_BLOCKS, for
    onnxruntime's cache) gives the rows one RoiAlign over all channels gives, bit for bit, at 0, 1
    and many RoIs over two images; channel counts it does not divide pool in one pass."""
    import export.lowering as lowering

    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    g = torch.Generator().manual_seed(5)
    feats = tuple(torch.randn(2, 8, int(256 * s), int(320 * s), generator=g) for s in scales)
    module = _MultiScale(scales)
    rois = _rois(300, 2, 300.0, g)
    dyn = ({0: Dim("K")}, (None,) * len(feats))
    blocked = _export(module, (rois, *feats), dyn)
    monkeypatch.setattr(lowering, "ROI_CHANNEL_BLOCKS", 1)
    one_pass = _export(module, (rois, *feats), dyn)
    monkeypatch.setattr(lowering, "ROI_CHANNEL_BLOCKS", 3)  # 8 channels: not divisible, one pass
    fallback = _export(module, (rois, *feats), dyn)
    tiles = [sum(n.op_type == "Tile" for n in p.graph.node) for p in (blocked, one_pass, fallback)]
    assert tiles == [8, 0, 0]  # boxes and map ids tiled per level
    for k in (300, 1, 0):
        want = module(rois[:k], *feats).numpy()
        got = [_run_proto(p, (rois[:k], *feats))[0] for p in (blocked, one_pass, fallback)]
        assert got[0].shape == (k, 8, 7, 7)
        np.testing.assert_array_equal(got[0], got[1])
        np.testing.assert_array_equal(got[2], got[1])
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
