"""TensorRT (skipped here: no TensorRT/GPU on the development machines) and Triton repository layout."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from export.tensorrt import BuildOptions
from export.triton import write_model_repository
from runtime.backends.tensorrt_io import import_tensorrt

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="TensorRT 10 and a CUDA GPU are not available on this machine")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_says_what_to_install():
    with pytest.raises(ImportError, match="pip install tensorrt"):
        import_tensorrt()


@needs_trt
def test_engine_matches_onnxruntime(tiny_net, tiny_onnx, tmp_path):
    from export.tensorrt import build_engine
    from export.verify import compare, synthetic_images
    from runtime import Pipeline

    engine = build_engine(tiny_onnx, tmp_path / "tiny.engine",
                          BuildOptions(min_shape=(1, 64, 64), opt_shape=(2, 512, 512), max_shape=(4, 512, 512)))
    net, meta = tiny_net
    report, _, _ = compare(Pipeline.from_model(net, meta.config, meta.class_names), Pipeline.load(engine),
                           synthetic_images(), batch_size=2)
    assert report.match_rate >= 0.99, report.to_json()


def test_triton_repository_for_nms_graph_batches_dynamically(tiny_nms_onnx, tmp_path):
    cfg = write_model_repository(tiny_nms_onnx, tmp_path / "repo", name="frcnn", max_batch_size=4).read_text()
    assert (tmp_path / "repo" / "frcnn" / "1" / "model.onnx").exists()
    assert (tmp_path / "repo" / "frcnn" / "labels.txt").read_text().split("\n")[1] == "circle"
    assert 'platform: "onnxruntime_onnx"' in cfg and "max_batch_size: 4" in cfg
    assert "dims: [3, -1, -1]" in cfg and "dims: [2]" in cfg  # images, image_sizes without the batch dim
    assert "dims: [20, 4]" in cfg and "dims: [20]" in cfg  # boxes, scores/labels padded to K = 20
    assert "reshape: { shape: [ ] }" in cfg  # num_detections: one scalar per request
    assert "dynamic_batching" in cfg and "preferred_batch_size: [1, 2, 4]" in cfg


def test_triton_repository_for_raw_graph_has_no_batcher(tiny_onnx, tmp_path):
    cfg = write_model_repository(tiny_onnx, tmp_path / "repo").read_text()
    assert "max_batch_size: 0" in cfg and "dynamic_batching {" not in cfg
    assert "dims: [-1, 3, -1, -1]" in cfg and "dims: [-1, 5, 4]" in cfg
