"""TensorRT (skipped here: no TensorRT/GPU on the development machines) and the Triton model repository:
every config.pbtxt written is parsed with Triton's own ModelConfig schema (tritonclient's
model_config_pb2 + protobuf text_format) and checked against the ONNX graph's tensors the way Triton's
onnxruntime backend checks them; the client's preprocessing step (runtime/triton_io.py) runs the
repository's graph on onnxruntime -- standing in for Triton, which runs the same file with the same
runtime -- and gives the detections of runtime.Pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from export.tensorrt import BuildOptions
from export.triton import write_model_repository
from runtime.backends.tensorrt_io import import_tensorrt


def parse_config(path) -> object:
    """config.pbtxt -> tritonclient's ModelConfig (text_format refuses unknown fields and bad syntax)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient[grpc] is a test dependency (make install)")
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def assert_config_matches_graph(config, onnx_path) -> None:
    """Triton's onnxruntime backend refuses a config whose tensors differ from the model's: names,
    types, and dims (with the batch dim added when max_batch_size > 0, reshape applied)."""
    import onnx
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    np_types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.FLOAT16: "TYPE_FP16"}

    def shape(vi):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, v in zip(declared, actual, strict=True):
            assert model_config_pb2.DataType.Name(t.data_type) == np_types[v.type.tensor_type.elem_type]
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            if config.max_batch_size > 0:
                dims = [-1, *dims]
            assert len(dims) == len(shape(v)) and all(d == a or a == -1 for d, a in zip(dims, shape(v))), \
                (t.name, dims, shape(v))


HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="TensorRT (10 or 11) and a CUDA GPU are not available on this machine")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_says_what_to_install():
    with pytest.raises(ImportError, match="pip install tensorrt"):
        import_tensorrt()


@needs_trt
def test_engine_matches_the_checkpoint(tiny_net, tiny_onnx, tmp_path):
    from export.tensorrt import build_engine
    from export.verify import compare, synthetic_images
    from runtime.pipeline import Pipeline

    engine = build_engine(tiny_onnx, tmp_path / "tiny.engine",
                          BuildOptions(min_shape=(1, 64, 64), opt_shape=(2, 512, 512), max_shape=(4, 512, 512)))
    net, meta = tiny_net
    reference = Pipeline.from_model(net, meta.config, meta.class_names)
    report, _, _ = compare(reference, Pipeline.load(engine), synthetic_images(), batch_size=2)
    assert report.match_rate >= 0.99, report.to_json()


def test_triton_repository_for_nms_graph_batches_dynamically(tiny_nms_onnx, tmp_path):
    path = write_model_repository(tiny_nms_onnx, tmp_path / "repo", name="frcnn", max_batch_size=4)
    cfg = path.read_text()
    config = parse_config(path)
    assert config.name == "frcnn" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert_config_matches_graph(config, tmp_path / "repo" / "frcnn" / "1" / "model.onnx")
    assert (tmp_path / "repo" / "frcnn" / "1" / "model.onnx").exists()
    assert (tmp_path / "repo" / "frcnn" / "labels.txt").read_text().split("\n")[1] == "circle"
    assert 'platform: "onnxruntime_onnx"' in cfg and "max_batch_size: 4" in cfg
    assert "dims: [3, -1, -1]" in cfg and "dims: [2]" in cfg  # images, image_sizes without the batch dim
    assert "dims: [20, 4]" in cfg and "dims: [20]" in cfg  # boxes, scores/labels padded to K = 20
    assert "reshape: { shape: [ ] }" in cfg  # num_detections: one scalar per request
    assert "dynamic_batching" in cfg and "preferred_batch_size: [1, 2, 4]" in cfg


def test_triton_repository_for_raw_graph_has_no_batcher(tiny_onnx, tmp_path):
    path = write_model_repository(tiny_onnx, tmp_path / "repo")
    cfg = path.read_text()
    config = parse_config(path)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert_config_matches_graph(config, tmp_path / "repo" / "frcnn" / "1" / "model.onnx")
    assert "max_batch_size: 0" in cfg and "dynamic_batching {" not in cfg
    assert "dims: [-1, 3, -1, -1]" in cfg and "dims: [-1, 5, 4]" in cfg


@pytest.fixture(scope="module")
def checkpoint_repo(tiny_checkpoint, tmp_path_factory) -> Path:
    """`python -m export triton --checkpoint CKPT` with its defaults (only the gate skipped: the
    session's other exports of this checkpoint are gated)."""
    from export.__main__ import main

    repo = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["triton", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo), "--max-detections", "20",
                 "--no-verify"]) == 0
    return repo / "frcnn"


def test_default_repository_from_a_checkpoint_is_the_batchable_nms_graph(checkpoint_repo):
    from runtime.triton_io import read_repository_metadata

    config = parse_config(checkpoint_repo / "config.pbtxt")
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8]
    assert [o.name for o in config.output] == ["boxes", "scores", "labels", "num_detections"]
    assert list(config.output[0].dims) == [20, 4] and list(config.output[3].reshape.shape) == []
    assert_config_matches_graph(config, checkpoint_repo / "1" / "model.onnx")
    meta = read_repository_metadata(checkpoint_repo)
    assert meta.with_nms and meta.max_detections == 20 and meta.class_names[1] == "circle"
    assert (checkpoint_repo / "labels.txt").read_text().split("\n")[:2] == ["__background__", "circle"]


def test_raw_layout_stays_an_option(tiny_checkpoint, tmp_path):
    from export.__main__ import main

    assert main(["triton", "--checkpoint", str(tiny_checkpoint), "--repo", str(tmp_path), "--raw", "--no-verify",
                 "--name", "raw"]) == 0
    config = parse_config(tmp_path / "raw" / "config.pbtxt")
    assert config.max_batch_size == 0 and [o.name for o in config.output] == ["batch_idx", "scores", "boxes"]
    assert_config_matches_graph(config, tmp_path / "raw" / "1" / "model.onnx")


def _run_repository_graph(model_dir, inputs: dict) -> dict:
    """The repository's graph on onnxruntime's CPU provider, as Triton's onnxruntime backend runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _match_rate(got: dict, want) -> float:
    """Share of `want`'s detections found in `got` (same label, score within 1e-4, box within
    0.05 px), matched as sets: rows whose scores tie may come in either order."""
    unmatched, hits = list(range(len(got["scores"]))), 0
    for box, score, label in zip(want.boxes.numpy(), want.scores.numpy(), want.labels.numpy(), strict=True):
        found = [j for j in unmatched if got["labels"][j] == label and abs(got["scores"][j] - score) <= 1e-4
                 and np.abs(got["boxes"][j] - box).max() <= 0.05]
        if found:
            unmatched.remove(found[0])
            hits += 1
    return hits / max(1, len(want.scores))


def test_client_step_gives_the_pipeline_detections(checkpoint_repo, tiny_checkpoint, coco_images):
    """triton_inputs -> the repository's graph -> triton_detections equals runtime.Pipeline on the
    checkpoint: exactly for each image at its own padded size (one request per size, as a client
    sends them); within the documented border effect when all are padded to the common square."""
    from runtime import Pipeline
    from runtime.triton_io import common_size, read_repository_metadata, triton_detections, triton_inputs

    meta = read_repository_metadata(checkpoint_repo)
    images = [im.permute(1, 2, 0).contiguous().numpy() for im in coco_images[:3]]
    pipe = Pipeline.load(tiny_checkpoint, backend="torch")
    want = pipe.predict(images, pipe.options(score_threshold=meta.postprocess["score_thresh"], max_detections=20))
    for image, w in zip(images, want, strict=True):
        inputs, originals = triton_inputs([image], meta.input_settings)
        assert inputs["images"].shape[2:] == pipe.padded_size(pipe.prepare(image))
        got = triton_detections(_run_repository_graph(checkpoint_repo, inputs), inputs["image_sizes"], originals)[0]
        assert len(got["scores"]) == len(w.scores) > 0 and _match_rate(got, w) == 1.0

    s = common_size(meta.input_settings)
    inputs, originals = triton_inputs(images, meta.input_settings, size=s)
    assert inputs["images"].shape == (3, 3, s, s) and inputs["image_sizes"].dtype == np.int64
    got = triton_detections(_run_repository_graph(checkpoint_repo, inputs), inputs["image_sizes"], originals)
    rates = [_match_rate(g, w) for g, w in zip(got, want, strict=True)]
    assert min(rates) >= 0.9, rates
