"""One exported tiny graph against the eager model: any batch size, any image size, padding, the
declared contract, a checked and folded graph; and the --with-nms graph against model.postprocess."""

from __future__ import annotations

import onnx
import pytest
import torch

from export.tensorrt_ops import tensorrt_problems
from export.verify import compare, synthetic_images
from model.postprocess import postprocess
from model.transform import preprocess
from runtime import Pipeline, contract
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

pytest.importorskip("onnxruntime")

SIZES = [(480, 640), (600, 400), (333, 517), (200, 900), (512, 512)]


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_is_checked_folded_and_declares_the_contract(tiny_onnx):
    m = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(m, full_check=True)
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    assert [(i.name, _dims(i)) for i in m.graph.input] == [("images", ["B", 3, "H", "W"]),
                                                           ("image_sizes", ["B", 2])]
    assert [(o.name, _dims(o)) for o in m.graph.output] == [("batch_idx", ["R"]), ("scores", ["R", 5]),
                                                            ("boxes", ["R", 5, 4])]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [onnx.TensorProto.INT64,
                                                                      onnx.TensorProto.FLOAT,
                                                                      onnx.TensorProto.FLOAT]
    meta = contract.GraphMetadata.from_props({p.key: p.value for p in m.metadata_props})
    assert meta.flavour == "raw" and meta.class_names[1] == "circle"
    assert meta.input_settings["min_size"] == 320 and meta.input_settings["size_divisible"] == 32
    # only standard ops, all parseable by TensorRT 10; RoIAlign/NMS lowered, not left as custom ops
    ops = {n.op_type for n in m.graph.node}
    assert {"RoiAlign", "NonMaxSuppression"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert tensorrt_problems(m) == []
    # constants folded: no node computes from constants alone (shape arithmetic on fixed dims included)
    constant = {i.name for i in m.graph.initializer}
    constant |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    foldable = [n.op_type for n in m.graph.node
                if n.op_type != "Constant" and n.input and all(i in constant or i == "" for i in n.input)]
    assert foldable == []
    assert len(m.graph.node) < 800  # the whole tiny detector, dynamic shapes included (13 per level for RoiAlign blocks)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_any_batch_size_and_image_size_matches_eager(tiny_net, tiny_onnx, batch_size):
    net, meta = tiny_net
    other = Pipeline(OnnxRuntimeBackend(tiny_onnx, intra_op_threads=2), meta.config, meta.class_names, "tiny")
    images = synthetic_images(SIZES[:4], seed=batch_size)  # batches mix sizes, so most images are padded
    report, dets_t, dets_o = compare(Pipeline.from_model(net, meta.config, meta.class_names), other, images,
                                     batch_size=batch_size, same_size=False)
    assert report.detections_torch > 0
    assert report.match_rate >= 0.99, report.to_json()
    # raw outputs compared where both kept the same RoIs (a near-tie in the RPN's top-k/NMS of this
    # random net may flip one RoI; the detections above still match)
    assert report.same_rois_batches >= 1
    assert report.max_abs_diff["scores"] < 1e-4 and report.max_abs_diff["boxes"] < 1e-2


def _image_major(raw):
    """Rows stably sorted by image: the graph's RPN NMS runs image by image (images on
    NonMaxSuppression's batch dimension), eager's over the whole batch in score order; within each
    image both keep the same RoIs in the same order."""
    order = torch.sort(raw.batch_idx, stable=True).indices
    return type(raw)(raw.batch_idx[order], raw.scores[order], raw.boxes[order])


@pytest.mark.parametrize("sizes", [[(300, 500), (520, 260), (410, 410)],
                                   [(300, 500), (520, 260), (410, 410), (333, 517)]])
def test_raw_outputs_equal_eager_on_a_padded_batch(tiny_net, tiny_onnx, sizes):
    net, meta = tiny_net
    batch = preprocess(synthetic_images(sizes, seed=7), meta.config.transform)
    h, w = batch.images.shape[-2:]
    assert h % 32 == 0 and w % 32 == 0 and len({tuple(s) for s in batch.image_sizes.tolist()}) == len(sizes)
    with torch.no_grad():
        want = _image_major(net(batch.images, batch.image_sizes))
    got = OnnxRuntimeBackend(tiny_onnx)(batch.images, batch.image_sizes)
    assert torch.equal(got.batch_idx, want.batch_idx)
    assert sorted(set(got.batch_idx.tolist())) == list(range(len(sizes)))
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-4, atol=1e-3)


def test_nms_graph_gives_postprocess_detections(tiny_net, tiny_nms_onnx):
    net, meta = tiny_net
    rh = meta.config.roi_heads
    backend = OnnxRuntimeBackend(tiny_nms_onnx)
    assert backend.metadata.with_nms and backend.metadata.max_detections == 20
    batch = preprocess(synthetic_images(SIZES[:3], seed=3), meta.config.transform)
    boxes, scores, labels, num = (torch.from_numpy(a) for a in backend.run(batch.images, batch.image_sizes))
    assert boxes.shape == (3, 20, 4) and scores.shape == (3, 20) and labels.dtype == torch.int64
    with torch.no_grad():
        raw = net(batch.images, batch.image_sizes)
    want = postprocess(raw, batch.image_sizes, batch.image_sizes, score_thresh=rh.score_thresh,
                       nms_thresh=rh.nms_thresh, detections_per_img=20, min_size=rh.min_size)
    for i, det in enumerate(want):
        n = int(num[i])
        assert n == len(det.scores)
        torch.testing.assert_close(scores[i, :n], det.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(boxes[i, :n], det.boxes, rtol=1e-4, atol=1e-3)
        assert torch.equal(labels[i, :n], det.labels)
        assert not scores[i, n:].any() and not labels[i, n:].any()  # padding rows are zero
    # through the backend protocol the same detections come back from the shared postprocess
    again = postprocess(backend(batch.images, batch.image_sizes), batch.image_sizes, batch.image_sizes,
                        score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh, detections_per_img=20)
    for a, b in zip(again, want, strict=True):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
