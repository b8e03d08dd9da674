"""Precision is a property of the exported graph: an fp32 graph -> fp16 (mixed) or int8 (Q/DQ).

    int8 = quantize_int8(fp32_path, out_path, calibration_feeds(pipe, images))
    fp16 = convert_fp16(onnx.load(fp32_path))
    set_precision(proto, "int8"); precision_of(proto) -> "int8"

One graph serves every runtime: onnxruntime (CPU) runs it as is, and TensorRT 10/11 builds it as a
strongly typed network (export/tensorrt.py), where the graph's own types and Q/DQ nodes decide the
precision of every layer; no builder flags, no calibrator.

What is reduced: the dense layers (Conv, Gemm) of the backbone, the FPN, the RPN's shared 3x3 conv
and the box head (fc6, fc7): nearly all the FLOPs; int8 also the feature Adds and their ReLUs
(int8_nodes). What stays float (FLOAT_LAYERS, and every other op): the RPN's objectness and delta
1x1 convs and the box predictor (they rank proposals and classes, where rounding reorders
near-equal scores), so box decoding, RoiAlign coordinates, the NMS inputs and the score softmax
all compute in fp32 from fp32 inputs.

int8 (onnxruntime.quantization, static, QDQ): per-channel symmetric int8 weights, per-tensor
asymmetric uint8 activations (onnxruntime's fast x86 kernels: VNNI u8 x s8; a zero point at 0 lets
onnxruntime fold each ReLU into the quantization's clamp, and post-ReLU tensors use all 256 steps),
int32 biases (what onnxruntime's fused QLinearConv takes), calibrated by MinMax over real images run
through the project's own prepare/collate (runtime.Pipeline), one image per batch. Quantized: the
dense layers, and the feature additions (ResNet's residual Adds, the FPN's top-down Adds) with the
ReLUs after them, so that onnxruntime runs QLinearAdd on uint8 instead of dequantize -> Add -> ReLU
-> quantize over the largest tensors of the net (R50-FPN: 0.62 -> 0.54 s per image, measured).
TensorRT's explicit quantization is signed and symmetric: export/tensorrt_ops.tensorrt_ready
rewrites each activation's (scale, zero point) to int8 with zero point 0 over the same calibrated
range (max |min|, |max|), which is the graph symmetric calibration gives, and folds the int32 biases
back to float. Chosen by measured box AP (README, "Precision"): on the shapes-trained tiny detector
MinMax lost the least; Entropy gave MinMax's very ranges (onnxruntime 1.32) and Percentile lost more.
MinMax also keeps only two numbers per tensor where the histogram methods hold every activation of
every calibration image, which R50-FPN at 600/1000 does not fit in memory for long.

fp16 (onnxconverter-common, keep_io_types): the same layers, the ReLU/Add/MaxPool between them
following; the converter's side effects on the fp32 parts (every initializer rounded to fp16, -inf
clamped, float outputs cast to fp16) are undone after it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from runtime.contract import META_PRECISION

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# weights of layers kept float in reduced-precision graphs (substrings: BN folding renames weights
# to e.g. "ConvMulFusion_W_net.rpn.head.cls_logits.weight")
FLOAT_LAYERS = ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor")
DENSE_OPS = ("Conv", "Gemm")
# ops whose inputs must be float (not dequantized int8, not fp16): the exact parts
EXACT_OPS = ("RoiAlign", "NonMaxSuppression", "Softmax", "Exp", "TopK")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def set_precision(proto: onnx.ModelProto, precision: str) -> None:
    """Record `precision` in the graph metadata (replacing any earlier value)."""
    import json

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    props = {p.key: p.value for p in proto.metadata_props}
    props[META_PRECISION] = json.dumps(precision)
    onnx.helper.set_model_props(proto, props)


def precision_of(proto_or_props) -> str:
    """"fp32" | "fp16" | "int8" from a ModelProto or a metadata dict (graphs without the key: fp32)."""
    import json

    props = proto_or_props
    if isinstance(proto_or_props, onnx.ModelProto):
        props = {p.key: p.value for p in proto_or_props.metadata_props}
    return json.loads(props.get(META_PRECISION, '"fp32"'))


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer}


def merge_float_heads(graph: onnx.GraphProto) -> int:
    """Sibling float-kept convs (FLOAT_LAYERS) reading the same map with the same attributes -> one
    Conv over their concatenated weights and a Split of its channels back to their outputs, in place.

    The RPN's objectness and delta 1x1 convs read the same map at every FPN level: as two convs,
    onnxruntime reorders that map for its blocked float kernel twice (and in an int8 graph
    dequantizes it twice). Each output channel is still its own dot product over the same inputs.
    Only float-kept layers: merged quantized siblings would share one activation range.
    Returns the number of Conv nodes removed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}

    def key(n: onnx.NodeProto):
        consts = [i for i in n.input[1:] if i]
        if (n.op_type != "Conv" or not all(i in inits for i in consts) or len(consts) != len(n.input) - 1
                or not any(part in n.input[1] for part in FLOAT_LAYERS) or _attr(n, "group") not in (None, 1)):
            return None
        attrs = tuple(sorted(a.SerializeToString() for a in n.attribute))
        return n.input[0], len(consts), tuple(inits[n.input[1]].dims[1:]), attrs

    groups: dict = {}
    for n in graph.node:
        k = key(n)
        if k is not None:
            groups.setdefault(k, []).append(n)
    removed, merged_from = 0, set()
    for members in groups.values():
        if len(members) < 2:
            continue
        # weight (and bias, where the Conv has one): concatenated along the output channels, once
        # for every FPN level that shares them
        names = ["+".join(m.input[j] for m in members) for j in range(1, len(members[0].input))]
        sizes_name = names[0] + ".split"
        if names[0] not in inits:
            parts = [[numpy_helper.to_array(inits[m.input[j]]) for m in members] for j in range(1, len(members[0].input))]
            values = [np.concatenate(p) for p in parts] + [np.array([w.shape[0] for w in parts[0]], dtype=np.int64)]
            for name, value in zip([*names, sizes_name], values, strict=True):
                graph.initializer.append(numpy_helper.from_array(value, name))
                inits[name] = graph.initializer[-1]
        first = members[0]
        merged_out = first.output[0] + ".merged"
        conv = onnx.helper.make_node("Conv", [first.input[0], *names], [merged_out], name=first.name + ".merged")
        conv.attribute.extend(first.attribute)
        split = onnx.helper.make_node("Split", [merged_out, sizes_name], [m.output[0] for m in members],
                                      name=first.name + ".split", axis=1)
        pos = list(graph.node).index(first)
        for m in members:
            graph.node.remove(m)
            merged_from.update(m.input[1:])
        graph.node.insert(pos, conv)
        graph.node.insert(pos + 1, split)
        removed += len(members) - 1
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name in merged_from and t.name not in used]:
        graph.initializer.remove(t)
    return removed


def reduced_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv/Gemm nodes a reduced-precision graph computes in int8 or fp16: every dense
    layer with a weight initializer, except FLOAT_LAYERS."""
    weights = _initializer_names(model.graph)
    out = []
    for n in model.graph.node:
        if n.op_type not in DENSE_OPS or len(n.input) < 2 or n.input[1] not in weights:
            continue
        if any(part in n.input[1] for part in FLOAT_LAYERS):
            continue
        out.append(n.name)
    return out


# ---------------------------------------------------------------------------------------------- int8

# producers of feature maps: an Add of two of them is a residual or FPN top-down addition (box
# decoding's Adds read constants, shapes and slices, never two of these)
_FEATURE_OPS = ("Conv", "Relu", "Resize", "MaxPool", "Add")


def int8_nodes(model: onnx.ModelProto) -> list[str]:
    """Node names quantized to int8: reduced_nodes, the Adds of two feature maps (ResNet's residual
    additions, the FPN's top-down sums) and the ReLUs right after any of those.

    A quantized ReLU is removed by the quantizer: its producer's output takes the ReLU's range
    ([0, max], zero point 0), so QLinearConv -> QLinearConv runs with no requantization between.
    A float ReLU after a quantized Conv left DequantizeLinear -> QuantizeLinear on every
    bottleneck's inner activations (onnxruntime folds the ReLU into the Q, not the pair into the
    conv): R50-FPN 27 such pairs, about 13 ms per image, measured."""
    produced = {o: n for n in model.graph.node for o in n.output}
    dense = reduced_nodes(model)
    adds = [n.name for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2
            and all(i in produced and produced[i].op_type in _FEATURE_OPS for i in n.input)]
    before_relu = set(adds) | set(dense)
    relus = [n.name for n in model.graph.node if n.op_type == "Relu" and n.input[0] in produced
             and produced[n.input[0]].name in before_relu]
    return dense + adds + relus


def calibration_feeds(pipe, images: Iterable[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """(h, w, 3) uint8 images -> graph feeds, one image per batch, through pipe.prepare/collate (the
    serving path: same resize and normalisation; padded as in one batch of them all, to one common
    size, which the histogram calibrators need: they stack every image's activations)."""
    prepared = [pipe.prepare(img) for img in images]
    if not prepared:
        raise ValueError("int8 calibration needs at least one image")
    batch = pipe.collate(prepared)  # (N, 3, H, W), sizes (N, 2)
    return [{"images": np.ascontiguousarray(batch.images[i:i + 1].numpy(), dtype=np.float32),
             "image_sizes": np.ascontiguousarray(batch.image_sizes[i:i + 1].numpy(), dtype=np.int64)}
            for i in range(len(prepared))]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, feeds: Sequence[dict[str, np.ndarray]], *,
                  method: str = "minmax", nodes: Sequence[str] | None = None) -> Path:
    """Static QDQ int8 of `fp32_path` calibrated on `feeds`; writes `out_path`.

    nodes: the node names to quantize (default: int8_nodes of the pre-processed graph).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, not {method!r}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="frcnn_int8_") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # onnxruntime's basic graph optimisations (BatchNorm folded into Conv, so the folded weight is
        # what gets quantized per channel); symbolic shape inference cannot follow NonZero-sized dims
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        m = onnx.load(str(pre))
        wanted = list(nodes) if nodes is not None else int8_nodes(m)
        quantize_static(
            str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            # uint8 activations, asymmetric: onnxruntime's fast x86 kernels (VNNI: u8 x s8) take
            # uint8 (int8 activations ran no faster than fp32, measured), and a zero point at the
            # bottom of a ReLU's range lets it drop the ReLU; tensorrt_ready makes them symmetric
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=[*DENSE_OPS, "Add", "Relu"], nodes_to_quantize=wanted,
            calibrate_method=methods[method],
            # outputs quantized too: DQ -> Conv -> Q is what onnxruntime fuses into QLinearConv (with
            # float Conv outputs it runs fp32 convolutions on dequantized inputs, no faster than fp32)
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    q = onnx.load(str(out_path))
    if _shapes_from_quantized(q.graph):
        onnx.save_model(q, str(out_path))
    log.info("int8: %d nodes quantized (%s calibration, %d images)", len(wanted), method, len(feeds))
    return out_path


def _shapes_from_quantized(graph: onnx.GraphProto) -> int:
    """Shape nodes read a DequantizeLinear's int8 input instead of its float output (the same
    shape), and DequantizeLinear nodes left without consumers are removed. The quantizer puts a DQ in
    front of every consumer of a quantized tensor, Shape included: the FPN's top-down Resize reads
    its target size from the lateral map, and R50-FPN dequantized the whole 256 x H/4 x W/4 map
    twice per image only for that (9 ms, measured). Returns the number of Shape nodes rewired."""
    produced = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for n in graph.node:
        src = produced.get(n.input[0]) if n.op_type == "Shape" and n.input else None
        if src is not None and src.op_type == "DequantizeLinear":
            n.input[0] = src.input[0]
            rewired += 1
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]
        if not dead:
            return rewired
        for n in dead:
            graph.node.remove(n)


def to_precision(proto: onnx.ModelProto, precision: str, *, feeds: Sequence[dict] | None = None,
                 method: str = "minmax") -> onnx.ModelProto:
    """An fp32 frcnn graph -> the same graph at `precision`, metadata kept and "precision" recorded.
    int8 needs calibration `feeds` (calibration_feeds)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    props = {p.key: p.value for p in proto.metadata_props}
    if precision == "fp16":
        out = convert_fp16(proto)
    elif precision == "int8":
        if not feeds:
            raise ValueError("int8 needs calibration images (--calib-images DIR)")
        with tempfile.TemporaryDirectory(prefix="frcnn_int8_") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            onnx.save_model(proto, str(fp32))
            out = onnx.load(str(quantize_int8(fp32, Path(tmp) / "int8.onnx", feeds, method=method)))
    else:
        out = proto
    onnx.helper.set_model_props(out, props)
    set_precision(out, precision)
    out.producer_name = proto.producer_name
    return out


# ---------------------------------------------------------------------------------------------- fp16

# float ops that may join the fp16 region when every float input they read is fp16 already (the
# activations between dense layers); anything else computes in fp32 behind a Cast
_FP16_FOLLOWERS = ("Relu", "Add", "MaxPool", "BatchNormalization", "Mul", "Sigmoid", "Clip")


def fp16_region(model: onnx.ModelProto) -> set[str]:
    """Node names converted to fp16: reduced_nodes plus the elementwise ops fed only by them (or by
    initializers). Everything else (FLOAT_LAYERS, RoiAlign, decoding, NMS, softmax) stays fp32."""
    region = set(reduced_nodes(model))
    consts = _initializer_names(model.graph)
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    produced_by = {o: n.name for n in model.graph.node for o in n.output}
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.name in region or n.op_type not in _FP16_FOLLOWERS:
                continue
            srcs = [i for i in n.input if i and i not in consts]
            if srcs and all(produced_by.get(i) in region for i in srcs):
                region.add(n.name)
                changed = True
    return region


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mixed fp16 graph (onnxconverter-common, keep_io_types: inputs and outputs stay float32)."""
    from onnxconverter_common import float16

    region = fp16_region(model)
    block = [n.name for n in model.graph.node if n.name not in region]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the converter edits its argument in place
    model = copy
    want = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    originals = {i.name: onnx.TensorProto.FromString(i.SerializeToString()) for i in model.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings():  # one per weight below fp16's range ("truncated to 1e-07")
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block,
                                               disable_shape_infer=True, check_fp16_ready=False)
    restored = _restore_float_initializers(out.graph, originals)
    _float_outputs(out.graph, want)
    log.info("fp16: %d nodes in fp16, %d kept fp32 (%d weights kept fp32)", len(region), len(block), restored)
    return out


def _float_outputs(graph: onnx.GraphProto, want: dict[str, int]) -> None:
    """Graph outputs back to their fp32 types: with a node block list the converter still ends each
    float output in a Cast to fp16 (despite keep_io_types); that Cast now casts to float32."""
    produced = {o: n for n in graph.node for o in n.output}
    for o in graph.output:
        t = o.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT16 or want.get(o.name) != onnx.TensorProto.FLOAT:
            continue
        node = produced[o.name]
        if node.op_type != "Cast":
            raise ValueError(f"fp16 conversion: output {o.name} is made by {node.op_type}, not a Cast")
        for a in node.attribute:
            if a.name == "to":
                a.i = onnx.TensorProto.FLOAT
        t.elem_type = onnx.TensorProto.FLOAT


def _restore_float_initializers(graph: onnx.GraphProto, originals: dict[str, onnx.TensorProto]) -> int:
    """The converter turns every float initializer to fp16, and a kept-fp32 node then reads
    Cast(fp16 -> fp32) of it: its weights rounded to fp16, and -inf (the padding-anchor mask) clamped
    to -10000. Give those readers the original fp32 tensor instead; returns how many were restored."""
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    drop, rename, added = [], {}, set()
    for n in graph.node:
        if n.op_type != "Cast" or _attr(n, "to") != onnx.TensorProto.FLOAT or n.input[0] not in originals:
            continue
        name = n.input[0]
        if inits.get(name) is None or inits[name].data_type != onnx.TensorProto.FLOAT16:
            continue
        fp32_name = f"{name}__fp32"
        if fp32_name not in added:
            t = onnx.TensorProto.FromString(originals[name].SerializeToString())
            t.name = fp32_name
            graph.initializer.append(t)
            added.add(fp32_name)
        rename[n.output[0]] = fp32_name
        drop.append(n)
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for o in graph.output:
        if o.name in rename:
            raise ValueError(f"graph output {o.name} is a constant")
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16 and t.name not in used]:
        graph.initializer.remove(t)
    return len(added)


# ------------------------------------------------------------------------------------------- checks

def exact_parts_problems(model: onnx.ModelProto) -> list[str]:
    """Reasons the exact parts are not float: an EXACT_OPS node reading a dequantized int8 tensor or a
    non-fp32 value, or a FLOAT_LAYERS layer with int8/fp16 weights (its input activations may be
    rounded, as every layer's are; its arithmetic and output are fp32). Empty list: all fp32."""
    produced = {o: n for n in model.graph.node for o in n.output}
    value_types = {v.name: v.type.tensor_type.elem_type
                   for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    weights = _initializer_names(model.graph)
    problems = []
    for n in model.graph.node:
        float_layer = (n.op_type in DENSE_OPS and len(n.input) > 1
                       and any(p in _weight_name(n.input[1], produced) for p in FLOAT_LAYERS))
        if n.op_type not in EXACT_OPS and not float_layer:
            continue
        # RoiAlign's features may be reduced, its boxes and batch indices not; a float layer's weights
        inputs = n.input[1:] if n.op_type == "RoiAlign" else n.input[1:2] if float_layer else n.input
        for name in inputs:
            if not name or name in weights:
                continue
            src = produced.get(name)
            if src is not None and src.op_type == "DequantizeLinear":
                problems.append(f"{n.op_type} {n.name} reads dequantized {name}")
            elif value_types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT16:
                problems.append(f"{n.op_type} {n.name} reads fp16 {name}")
            elif src is not None and src.op_type == "Cast" and _attr(src, "to") == onnx.TensorProto.FLOAT16:
                problems.append(f"{n.op_type} {n.name} reads fp16 {name}")
    return problems


def _weight_name(name: str, produced: dict) -> str:
    """A weight input's initializer name, looking through a DequantizeLinear (QDQ weights)."""
    src = produced.get(name)
    if src is not None and src.op_type == "DequantizeLinear":
        return src.input[0]
    return name


def _attr(node: onnx.NodeProto, key: str):
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return None
