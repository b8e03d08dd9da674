"""Which ONNX operators the TensorRT ONNX parser accepts, to check an exported graph without TensorRT.

The operator list is TensorRT 10's; 11.x accepts the same ops (it removed builder flags and
calibrators, not parser ops). Explicit quantization (--precision int8 graphs) is checked as TensorRT
takes it: QuantizeLinear/DequantizeLinear with int8, zero points 0 (symmetric), per-tensor or
per-channel scales.

Source: onnx/onnx-tensorrt, docs/operators.md ("TensorRT 10.15 supports operators in the inclusive
range of opset 9 to opset 24"), the rows marked "Y". Restrictions from that table that an frcnn
graph can hit are checked too (ScatterND/ScatterElements reduction, TopK sorted). Not checked here:
TopK's K < 3840 (K is data dependent in the RPN; pre_nms_top_n_test <= 3000 keeps it true; the
RoI locality sort, whose K is every RoI of the batch, is replaced by tensorrt_ready) and INMSLayer's
TopK box limit (5000 candidates per batch item).
"""

from __future__ import annotations

import onnx

TRT10_OPSET_RANGE = (9, 24)

TRT10_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Reasons the TensorRT 10 ONNX parser would reject `model` (empty list: none known)."""
    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not TRT10_OPSET_RANGE[0] <= imp.version <= TRT10_OPSET_RANGE[1]:
            problems.append(f"opset {imp.version} outside TensorRT 10's {TRT10_OPSET_RANGE}")
    local_functions = {(f.domain, f.name) for f in model.functions}
    initializers = {i.name: i for i in model.graph.initializer}
    seen = set()
    for node in _all_nodes(model):
        key = (node.domain, node.op_type)
        if key in local_functions:
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.domain}::{node.op_type}: custom domain")
        elif node.op_type not in TRT10_SUPPORTED_OPS and key not in seen:
            problems.append(f"{node.op_type}: not supported by the TensorRT 10 ONNX parser")
        elif node.op_type in ("ScatterND", "ScatterElements") and _attr(node, "reduction", b"none") not in (
                b"none", "none"):
            problems.append(f"{node.op_type} ({node.name}): reduction other than none")
        elif node.op_type == "TopK" and _attr(node, "sorted", 1) != 1:
            problems.append(f"TopK ({node.name}): sorted must be 1")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _qdq_problems(node, initializers)
        seen.add(key)
    return problems


def tensorrt_ready(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as the TensorRT builder parses it: int32 biases that onnxruntime's quantizer stores
    as DequantizeLinear(int32) folded back to float constants (TensorRT's explicit quantization
    dequantizes int8 only, and takes Conv/Gemm biases in float), and uint8 activations re-expressed
    as int8 with zero point 0 over the same calibrated range (TensorRT's quantization is symmetric).
    A copy; `model` is unchanged."""
    import numpy as np
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    folded = []
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            continue
        if inits[node.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype("float64")
        scale = numpy_helper.to_array(inits[node.input[1]]).astype("float64")
        zp = numpy_helper.to_array(inits[node.input[2]]).astype("float64") if len(node.input) > 2 and node.input[2] \
            else 0.0
        value = ((x - zp) * scale).astype(numpy_helper.to_array(inits[node.input[1]]).dtype)
        out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded.append(node)
    for node in folded:
        out.graph.node.remove(node)
    # uint8 activations (onnxruntime's asymmetric ranges) -> int8 with zero point 0 over the same
    # real range: scale = max(|lo|, |hi|) / 127.5, the parameters symmetric calibration gives
    # (zero point 128 is this already: the same values). Q and DQ of one tensor share the pair.
    done: dict[tuple[str, str], tuple[str, str]] = {}
    for node in out.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        key = (node.input[1], node.input[2])
        zp, scale = inits.get(key[1]), inits.get(key[0])
        if zp is None or scale is None or zp.data_type != onnx.TensorProto.UINT8:
            continue
        if key not in done:
            z = numpy_helper.to_array(zp).astype("float64")
            s = numpy_helper.to_array(scale).astype("float64")
            amax = np.maximum(np.abs((0.0 - z) * s), np.abs((255.0 - z) * s))
            new_scale = np.where(z == 128, s, amax / 127.5).astype(numpy_helper.to_array(scale).dtype)
            names = (f"{key[0]}__int8", f"{key[1]}__int8")
            out.graph.initializer.append(numpy_helper.from_array(new_scale, names[0]))
            out.graph.initializer.append(numpy_helper.from_array(np.zeros(z.shape, dtype=np.int8), names[1]))
            inits[names[0]], inits[names[1]] = out.graph.initializer[-2], out.graph.initializer[-1]
            done[key] = names
        node.input[1], node.input[2] = done[key]
    _identity_locality_order(out.graph)
    used = {i for n in out.graph.node for i in n.input}
    for t in [t for t in out.graph.initializer if t.name not in used]:
        out.graph.initializer.remove(t)
    return out


def _identity_locality_order(graph: onnx.GraphProto) -> None:
    """The RoI locality sort (export/lowering.locality_order: the graph's one ascending TopK over
    every RoI row, more than TensorRT's k <= 3840 at a batch of 4) -> the identity permutation,
    Range(0, k). Pooling results are written back to their own rows, so the outputs are the same."""
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "TopK" and _attr(n, "largest", 1) == 0]:
        values, indices = node.output[0], node.output[1]
        repl = [
            onnx.helper.make_node("Squeeze", [node.input[1]], [f"{indices}__k"]),
            onnx.helper.make_node("Constant", [], [f"{indices}__0"], value=onnx.helper.make_tensor(
                f"{indices}__0", onnx.TensorProto.INT64, [], [0])),
            onnx.helper.make_node("Constant", [], [f"{indices}__1"], value=onnx.helper.make_tensor(
                f"{indices}__1", onnx.TensorProto.INT64, [], [1])),
            onnx.helper.make_node("Range", [f"{indices}__0", f"{indices}__k", f"{indices}__1"], [indices]),
        ]
        if values and (values in outputs or any(values in n.input for n in graph.node)):
            repl.append(onnx.helper.make_node("Identity", [node.input[0]], [values]))
        pos = list(graph.node).index(node)
        graph.node.remove(node)
        for j, r in enumerate(repl):
            graph.node.insert(pos + j, r)


def _qdq_problems(node: onnx.NodeProto, initializers: dict) -> list[str]:
    """TensorRT's explicit quantization: int8 with zero point 0, scales constant and positive."""
    from onnx import numpy_helper

    out = []
    scale = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        out.append(f"{node.op_type} ({node.name}): scale is not a constant")
    elif (numpy_helper.to_array(scale) <= 0).any():
        out.append(f"{node.op_type} ({node.name}): scale <= 0")
    zp = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and zp is None:
        out.append(f"{node.op_type} ({node.name}): zero point is not a constant")
    elif zp is not None:
        if zp.data_type != onnx.TensorProto.INT8:
            out.append(f"{node.op_type} ({node.name}): {onnx.TensorProto.DataType.Name(zp.data_type)} "
                       "zero point (TensorRT quantizes to INT8)")
        elif numpy_helper.to_array(zp).any():
            out.append(f"{node.op_type} ({node.name}): zero point != 0 (TensorRT quantization is symmetric)")
    return out


def _all_nodes(model: onnx.ModelProto):
    stack = [model.graph, *(f for f in model.functions)]
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
