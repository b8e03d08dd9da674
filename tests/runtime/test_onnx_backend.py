"""OnnxRuntimeBackend on small hand-built graphs that follow runtime/contract.py (no model export)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from model.postprocess import postprocess
from runtime.contract import GraphMetadata

pytest.importorskip("onnxruntime")
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, nms_outputs_to_raw  # noqa: E402

CLASSES = ["__background__", "cat", "dog"]
SETTINGS = {"min_size": 320, "max_size": 512, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
            "size_divisible": 32}


def _meta(flavour: str, k: int | None = None) -> dict[str, str]:
    return GraphMetadata(flavour=flavour, class_names=CLASSES, input_settings=SETTINGS,
                         postprocess={"score_thresh": 0.05}, model_name="toy", max_detections=k).to_props()


def _raw_graph(path):
    """One RoI per image: batch_idx = arange(B); scores (0.1, 0.7, 0.2); boxes: the image's top-left
    quarter (0, 0, w/2, h/2) for every class."""
    nodes = [
        helper.make_node("Shape", ["image_sizes"], ["b1"], start=0, end=1),  # (1,) = [B]
        helper.make_node("Squeeze", ["b1"], ["b"]),
        helper.make_node("Range", ["zero", "b", "one"], ["batch_idx"]),
        helper.make_node("Concat", ["b1", "c"], ["scores_shape"], axis=0),
        helper.make_node("Expand", ["row", "scores_shape"], ["scores"]),
        helper.make_node("Concat", ["b1", "two_i"], ["zshape"], axis=0),
        helper.make_node("ConstantOfShape", ["zshape"], ["zeros2"]),  # (B, 2) float zeros
        helper.make_node("Cast", ["image_sizes"], ["hw"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["hw", "two"], ["half"]),
        helper.make_node("Gather", ["half", "wh_idx"], ["wh"], axis=1),  # (B, 2): w/2, h/2
        helper.make_node("Concat", ["zeros2", "wh"], ["box"], axis=1),  # (B, 4)
        helper.make_node("Unsqueeze", ["box", "axis1"], ["box1"]),
        helper.make_node("Concat", ["box1", "box1", "box1"], ["boxes"], axis=1),  # (B, 3, 4)
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("row", TensorProto.FLOAT, [1, 3], [0.1, 0.7, 0.2]),
        helper.make_tensor("c", TensorProto.INT64, [1], [3]),
        helper.make_tensor("two_i", TensorProto.INT64, [1], [2]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("wh_idx", TensorProto.INT64, [2], [1, 0]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, "H", "W"]),
         helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["B", 2])],
        [helper.make_tensor_value_info("batch_idx", TensorProto.INT64, ["R"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["R", 3]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["R", 3, 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(m, _meta("raw"))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def test_raw_graph_returns_raw_detections_and_metadata(tmp_path):
    backend = OnnxRuntimeBackend(_raw_graph(tmp_path / "toy.onnx"), providers=["cpu"], intra_op_threads=1,
                                 inter_op_threads=1, graph_optimization="basic")
    assert backend.class_names == CLASSES and backend.input_settings["min_size"] == 320
    assert backend.metadata.flavour == "raw" and backend.providers == ["CPUExecutionProvider"]
    # threads spin within a run only, leaving the cores to the next request's decode between runs
    assert backend.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    raw = backend(torch.zeros(2, 3, 64, 96), torch.tensor([[64, 96], [40, 80]]))
    assert raw.batch_idx.tolist() == [0, 1]
    torch.testing.assert_close(raw.scores, torch.tensor([[0.1, 0.7, 0.2]] * 2))
    assert raw.boxes[1, 2].tolist() == [0.0, 0.0, 40.0, 20.0]
    dets = postprocess(raw, torch.tensor([[64, 96], [40, 80]]), torch.tensor([[128, 192], [40, 80]]))
    assert dets[0].labels.tolist() == [1, 2] and dets[0].boxes[0].tolist() == [0.0, 0.0, 96.0, 64.0]


def test_bad_settings_are_refused(tmp_path):
    path = _raw_graph(tmp_path / "toy.onnx")
    with pytest.raises(ValueError, match="not available"):
        OnnxRuntimeBackend(path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxRuntimeBackend(path, graph_optimization="max")
    m = onnx.load(str(path))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not an frcnn graph"):
        OnnxRuntimeBackend(tmp_path / "bare.onnx")


def test_nms_outputs_become_raw_detections_that_postprocess_keeps():
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 40.0], [0, 0, 0, 0]],
                          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    scores = torch.tensor([[0.9, 0.4, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[2, 1, 0], [0, 0, 0]])
    num = torch.tensor([2, 0])
    raw = nms_outputs_to_raw(boxes, scores, labels, num, num_classes=3)
    assert raw.batch_idx.tolist() == [0, 0] and raw.scores.shape == (2, 3) and raw.boxes.shape == (2, 3, 4)
    sizes = torch.tensor([[50, 50], [50, 50]])
    dets = postprocess(raw, sizes, sizes * 2)
    assert dets[0].labels.tolist() == [2, 1] and np.allclose(dets[0].scores, [0.9, 0.4])
    assert dets[0].boxes[1].tolist() == [40.0, 40.0, 60.0, 80.0]  # rescaled to the original size
    assert len(dets[1].scores) == 0
