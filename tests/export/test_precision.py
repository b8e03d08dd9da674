"""Precision in the graph (export/precision.py), with real onnxruntime and real COCO128 photos: int8
(Q/DQ) and fp16 graphs of the tiny preset and of a torchvision-layout R50-FPN pass their gates (the
fixtures run export's own gate, so a fixture that builds is a gate passed), keep the exact parts in
fp32, record their precision, and pass the TensorRT ONNX-parser check; a graph that misses its
gate is reported and not left behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.precision import exact_parts_problems, precision_of
from export.tensorrt_ops import tensorrt_problems, tensorrt_ready
from runtime.pipeline import Pipeline

ort = pytest.importorskip("onnxruntime")


def _quantized_layers(m: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(weights of Conv/Gemm layers reading int8 Q/DQ weights, weights of those computing in fp32)."""
    produced = {o: n for n in m.graph.node for o in n.output}
    q, f = set(), set()
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        src = produced.get(n.input[1])
        if src is not None and src.op_type == "DequantizeLinear":
            q.add(src.input[0])
        else:
            f.add(n.input[1])
    return q, f


def _check_int8(path, *, min_quantized: int):
    m = onnx.load(str(path))
    assert precision_of(m) == "int8"
    assert exact_parts_problems(m) == []  # RoiAlign boxes, NMS, softmax, decoding: fp32 inputs
    q, f = _quantized_layers(m)
    assert len(q) >= min_quantized
    produced = {o: n for n in m.graph.node for o in n.output}
    from_dq = [n for n in m.graph.node if n.input and produced.get(n.input[0]) is not None
               and produced[n.input[0]].op_type == "DequantizeLinear"]
    # shapes are read from the int8 tensors (no map dequantized for its shape alone), and the ReLUs
    # after quantized convs are folded into them (no DQ -> ReLU -> Q between two int8 convs; the
    # quantizer keeps at most one, the RPN conv's on the small P6 map)
    assert not [n.name for n in from_dq if n.op_type == "Shape"]
    assert len([n for n in from_dq if n.op_type == "Relu"]) <= 1
    assert not [w for w in q if any(p in w for p in ("cls_logits", "bbox_pred", "box_predictor"))]
    assert [w for w in f if "box_predictor.cls_score" in w] and [w for w in f if "rpn.head.cls_logits" in w]
    # TensorRT's explicit quantization: symmetric int8, and every op parseable
    assert tensorrt_problems(tensorrt_ready(m)) == []
    # activations: uint8 with onnxruntime's asymmetric zero points here, int8 with zero point 0 as
    # the TensorRT builder parses it, over the same range (max |lo|, |hi| of the calibrated one)
    inits = {i.name: i for i in m.graph.initializer}
    zps = {n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert zps and all(inits[z].data_type == onnx.TensorProto.UINT8 for z in zps)
    assert any((onnx.numpy_helper.to_array(inits[z]) != 128).any() for z in zps)  # asymmetric ranges
    trt = tensorrt_ready(m)
    trt_inits = {i.name: i for i in trt.graph.initializer}
    for q, tq in zip((n for n in m.graph.node if n.op_type == "QuantizeLinear"),
                     (n for n in trt.graph.node if n.op_type == "QuantizeLinear"), strict=True):
        s, z = (onnx.numpy_helper.to_array(inits[i]).astype(np.float64) for i in q.input[1:3])
        ts, tz = (onnx.numpy_helper.to_array(trt_inits[i]) for i in tq.input[1:3])
        assert trt_inits[tq.input[2]].data_type == onnx.TensorProto.INT8 and not tz.any()
        want = np.where(z == 128, s, np.maximum(z * s, (255 - z) * s) / 127.5)  # 128: already symmetric
        assert np.allclose(ts, want, rtol=1e-6)


def _check_fp16(path, fp32_path):
    m = onnx.load(str(path))
    assert precision_of(m) == "fp16"
    assert exact_parts_problems(m) == []
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    half = [n for n in convs if inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16]
    assert len(half) >= len(convs) - 5  # all but the RPN's objectness+delta conv (merged; 5 levels)
    # inputs and outputs stay float32 (keep_io_types): the contract does not change
    assert {i.type.tensor_type.elem_type for i in m.graph.input} == {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    # fp32 kept where it matters: every -inf of the fp32 graph (the padding-anchor mask) is still
    # there, not clamped to fp16's -10000
    def infs(model):
        return sum(int(np.isneginf(onnx.numpy_helper.to_array(t)).sum()) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))

    assert infs(m) == infs(onnx.load(str(fp32_path)))
    assert tensorrt_problems(m) == []


@pytest.mark.parametrize("bias", [True, False])
def test_float_heads_reading_one_map_merge_into_one_conv_with_the_same_outputs(bias):
    """merge_float_heads: two float-kept 1x1 convs on one map become one Conv + Split, the outputs
    bit-equal; a quantized layer beside them (not in FLOAT_LAYERS) is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from export.precision import merge_float_heads

    rng = np.random.default_rng(0)
    convs, inits = [], []
    for name, cout in (("rpn.head.cls_logits", 3), ("rpn.head.bbox_pred", 12), ("backbone.conv", 5)):
        inits.append(numpy_helper.from_array(rng.standard_normal((cout, 16, 1, 1)).astype(np.float32), f"{name}.weight"))
        ins = ["x", f"{name}.weight"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}.bias"))
            ins.append(f"{name}.bias")
        convs.append(helper.make_node("Conv", ins, [name], name=name, kernel_shape=[1, 1]))
    graph = helper.make_graph(convs, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 11])],
                              [helper.make_tensor_value_info(c.output[0], TensorProto.FLOAT, [1, k, 9, 11])
                               for c, k in zip(convs, (3, 12, 5), strict=True)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((1, 16, 9, 11)).astype(np.float32)

    def run(mdl):
        return ort.InferenceSession(mdl.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    want = run(model)
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    assert merge_float_heads(merged.graph) == 1
    onnx.checker.check_model(merged, full_check=True)
    assert [n.op_type for n in merged.graph.node] == ["Conv", "Split", "Conv"]
    assert "rpn.head.cls_logits.weight" not in {i.name for i in merged.graph.initializer}
    for a, b in zip(run(merged), want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_int8_graph_passes_its_gate_and_keeps_exact_parts_float(tiny_int8_onnx):
    _check_int8(tiny_int8_onnx, min_quantized=15)


def test_tiny_fp16_graph_passes_its_gate_and_keeps_exact_parts_float(tiny_fp16_onnx, tiny_onnx):
    _check_fp16(tiny_fp16_onnx, tiny_onnx)


def test_reduced_graphs_serve_with_the_fp32_contract(tiny_onnx, tiny_int8_onnx, tiny_fp16_onnx, coco_images):
    """Pipeline.load reports the graph's precision; the outputs keep names, dtypes and meaning."""
    fp32 = Pipeline.load(tiny_onnx, threads=2)
    assert fp32.precision == "fp32"
    want = fp32.predict(coco_images[:2])
    for path, precision in ((tiny_int8_onnx, "int8"), (tiny_fp16_onnx, "fp16")):
        pipe = Pipeline.load(path, threads=2)
        assert pipe.precision == precision and pipe.class_names == fp32.class_names
        got = pipe.predict(coco_images[:2])
        for a, b in zip(got, want, strict=True):
            assert a.boxes.dtype == b.boxes.dtype and a.labels.dtype == b.labels.dtype
            assert abs(len(a.scores) - len(b.scores)) <= max(3, len(b.scores) // 5)


def test_onnxruntime_cpu_runs_fp16_conv_and_roialign_through_casts():
    """onnxruntime 1.32's CPU provider has no fp16 kernel for Conv or RoiAlign on x86: it inserts
    Casts and runs them in fp32, rounding every fp16 node's output back to fp16. So an fp16 graph
    runs (and is gated) here with fp16 storage and fp32 arithmetic, as TensorRT's fp16 tactics
    accumulate; its speed on CPU is no measure of anything."""
    from onnx import TensorProto as T
    from onnx import helper as h

    def ops_after_session(op, inputs, out_type):
        ins = [h.make_tensor_value_info(n, t, None) for n, t in inputs]
        g = h.make_graph([h.make_node(op, [n for n, _ in inputs], ["y"])], "g", ins,
                         [h.make_tensor_value_info("y", out_type, None)])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = f"{tmp}/m.onnx"
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return [n.op_type for n in onnx.load(f"{tmp}/m.onnx").graph.node]

    assert ops_after_session("Conv", [("x", T.FLOAT16), ("w", T.FLOAT16)], T.FLOAT16) == ["Cast", "Cast", "Conv", "Cast"]
    assert ops_after_session("RoiAlign", [("x", T.FLOAT16), ("r", T.FLOAT16), ("b", T.INT64)],
                             T.FLOAT16) == ["Cast", "Cast", "RoiAlign", "Cast"]


def test_int8_export_that_misses_its_gate_exits_1_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                     shared_data):
    """A badly calibrated int8 graph (ranges measured on images scaled to 1/1000: every real
    activation saturates) of the shapes-trained demo model misses its gate: one paragraph, exit 1,
    no graph at --out. (The random test model would pass: its boxes hardly depend on the image.)"""
    from pathlib import Path

    import export.precision
    from export.__main__ import main
    from tests.export.conftest import COCO

    demo = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-shapes"
    if not (demo / "model.safetensors").exists():
        pytest.skip(f"{demo} missing")

    real = export.precision.calibration_feeds

    def dimmed(pipe, images):
        return [{**f, "images": f["images"] * 1e-3} for f in real(pipe, images)]

    monkeypatch.setattr(export.precision, "calibration_feeds", dimmed)
    out = tmp_path / "tiny.int8.onnx"
    rc = main(["onnx", "--checkpoint", str(demo), "--out", str(out), "--precision", "int8",
               "--calib-images", str(COCO), "--calib-count", "3"])
    err = capsys.readouterr().err
    assert rc == 1, err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1  # one paragraph
    assert "(int8) failed its int8 gate" in message[0] and "--calib-images" in message[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".onnx"]


def test_int8_needs_calibration_images(tiny_checkpoint, tmp_path, capsys):
    from export.__main__ import main

    rc = main(["onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), "--precision", "int8"])
    assert rc == 2 and "--calib-images" in capsys.readouterr().err


def test_tensorrt_precision_flags_point_to_the_onnx_export(capsys):
    from export.__main__ import main

    assert main(["tensorrt", "--model", "m.onnx", "--out", "m.engine", "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16" in err and "python -m export onnx" in err


@pytest.mark.slow
def test_r50_int8_graph_passes_its_gate_and_keeps_exact_parts_float(r50_int8_onnx):
    _check_int8(r50_int8_onnx, min_quantized=60)


@pytest.mark.slow
def test_r50_fp16_graph_passes_its_gate_and_keeps_exact_parts_float(r50_fp16_onnx, r50_parity):
    _check_fp16(r50_fp16_onnx, r50_parity[1])
    meta = json.loads({p.key: p.value for p in onnx.load(str(r50_fp16_onnx), load_external_data=False)
                       .metadata_props}["frcnn.precision"])
    assert meta == "fp16"


def test_tensorrt_form_of_the_int8_graph_passes_the_int8_gate(tiny_int8_onnx, tiny_net, tmp_path):
    """What `export tensorrt` hands the builder (symmetric int8 activations, float biases) still is
    the gated detector: onnxruntime runs it (int8 Q/DQ) and it passes the int8 gate on the same images."""
    from export.verify import quick_verify
    from tests.export.conftest import _coco_arrays

    net, meta = tiny_net
    trt = tensorrt_ready(onnx.load(str(tiny_int8_onnx)))
    assert tensorrt_problems(trt) == []
    path = tmp_path / "tiny.int8.trt.onnx"
    onnx.save_model(trt, str(path))
    reference = Pipeline.from_model(net, meta.config, meta.class_names)
    report = quick_verify(reference, path, other=Pipeline.load(path, threads=2), real_images=_coco_arrays(8, 4))
    assert report.ok and report.match_rate >= 0.6
