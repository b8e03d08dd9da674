"""Winograd F(4x4, 3x3) rewrite (runtime/backends/winograd.py): the transforms' identity, the rewritten
graph against onnxruntime's direct Conv at odd sizes and batches, which convolutions it leaves alone,
and batch invariance (an image's output never depends on what else is in the batch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends.winograd import M_OUT, N_IN, filter_transform, transforms, winograd_convs

ort = pytest.importorskip("onnxruntime")


def test_transforms_compute_the_correlation_exactly_in_float64():
    at, g, bt = transforms()
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, w = rng.standard_normal(N_IN), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ w for i in range(M_OUT)])
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), want, rtol=0, atol=1e-12)
    w = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    u = np.einsum("ia,kcab,jb->ijkc", g, w.astype(np.float64), g).reshape(36, 1, 8, 5)  # G g G^T by definition
    np.testing.assert_allclose(filter_transform(w), u, rtol=1e-6, atol=1e-7)
    # the usual F(4, 3) input transform (Lavin and Gray) for points 0, +-1, +-2
    assert np.allclose(bt[0], [4, 0, -5, 0, 1, 0]) and np.allclose(bt[5], [0, 4, 0, -5, 0, 1])


def _conv_model(convs: list[dict], c_in: int) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv ... : each dict gives out channels and attributes (bias by default)."""
    rng = np.random.default_rng(1)
    nodes, inits, prev, c = [], [], "x", c_in
    for i, spec in enumerate(convs):
        spec = dict(spec)
        k, kernel, group = spec.pop("out"), spec.pop("kernel", 3), spec.get("group", 1)
        bias = spec.pop("bias", True)
        w = (rng.standard_normal((k, c // group, kernel, kernel)) / np.sqrt(c * kernel * kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        ins = [prev, f"w{i}"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", **spec))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, c = f"r{i}", k
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, "H2", "W2"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, winograd_convs(out)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


P1 = {"pads": [1, 1, 1, 1]}


def test_rewritten_convs_match_the_direct_conv_at_odd_sizes_and_batches():
    model = _conv_model([{"out": 128, **P1}, {"out": 160, **P1, "bias": False}, {"out": 128, **P1}], c_in=128)
    rewritten, count = _rewritten(model)
    assert count == 3
    assert "Conv" in _ops(rewritten) and "DepthToSpace" in _ops(rewritten)
    assert not any(n.op_type == "Conv" and n.input[1] in ("w0", "w1", "w2") for n in rewritten.graph.node)
    assert {i.name for i in rewritten.graph.initializer}.isdisjoint({"w0", "w1", "w2"})  # unused: dropped
    direct, wino = _session(model), _session(rewritten)
    rng = np.random.default_rng(2)
    for n, h, w in [(1, 1, 1), (1, 3, 5), (2, 7, 4), (1, 37, 53), (3, 64, 80)]:
        x = rng.standard_normal((n, 128, h, w)).astype(np.float32)
        want, got = direct.run(None, {"x": x})[0], wino.run(None, {"x": x})[0]
        assert got.shape == want.shape == (n, 128, h, w)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 2e-5, (n, h, w, err)  # fp32 Winograd F(4x4, 3x3): about 1e-5 relative
    # the same inputs through a wrong transform would be far off: the check above can fail
    assert np.abs(direct.run(None, {"x": x})[0] - wino.run(None, {"x": x[:, :, ::-1].copy()})[0]).max() > 1e-2


def test_an_image_gets_the_same_output_bit_for_bit_whatever_its_batch():
    model, _ = _rewritten(_conv_model([{"out": 128, **P1}, {"out": 128, **P1}], c_in=128))
    sess = _session(model)
    x = np.random.default_rng(3).standard_normal((4, 128, 45, 61)).astype(np.float32)
    batched = sess.run(None, {"x": x})[0]
    for i in range(4):
        assert np.array_equal(sess.run(None, {"x": x[i:i + 1]})[0][0], batched[i])


@pytest.mark.parametrize("spec, c_in", [
    ({"out": 128, "pads": [1, 1, 1, 1], "strides": [2, 2]}, 128),  # stride 2
    ({"out": 128, "pads": [2, 2, 2, 2], "dilations": [2, 2]}, 128),  # dilated
    ({"out": 128, "pads": [1, 1, 1, 1], "group": 2}, 128),  # grouped
    ({"out": 128, "pads": [0, 0, 0, 0]}, 128),  # no padding
    ({"out": 128, "kernel": 1}, 128),  # 1x1
    ({"out": 64, "pads": [1, 1, 1, 1]}, 128),  # too few output channels
    ({"out": 128, "pads": [1, 1, 1, 1]}, 64),  # too few input channels
])
def test_convs_it_cannot_or_should_not_rewrite_are_left_alone(spec, c_in):
    model = _conv_model([spec], c_in=c_in)
    rewritten, count = _rewritten(model)
    assert count == 0 and _ops(rewritten) == _ops(model)


def test_a_conv_whose_weight_is_computed_is_left_alone():
    """Weights from a node (a DequantizeLinear in int8 graphs) are not constants the filter transform
    can precompute."""
    model = _conv_model([{"out": 128, **P1}], c_in=128)
    w = next(i for i in model.graph.initializer if i.name == "w0")
    w.name = "w0_src"
    model.graph.node.insert(0, helper.make_node("Identity", ["w0_src"], ["w0"]))
    assert winograd_convs(model) == 0
