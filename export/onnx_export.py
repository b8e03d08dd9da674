"""Checkpoint -> ONNX graph with dynamic batch and image size, per the contract in contract.py.

    export_onnx(checkpoint_dir, out_path, opset=18, with_nms=False, max_detections=100, verify=True)

Steps: load the checkpoint, wrap the detector (wrappers.py), torch.onnx.export(dynamo=True) with the
frcnn op lowerings (lowering.py) and dynamic B, H, W; then onnxscript's optimizer (constant folding,
dead code, common subexpressions), onnx.checker (full check, which runs strict shape inference),
contract names for the dynamic dims, and the metadata that lets a backend run the graph alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from export.lowering import translation_table
from export.precision import merge_float_heads
from export.wrappers import NmsGraph, RawGraph, route_rpn_nms
from runtime import contract

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the lowerings use opset-18 forms (ReduceMax axes as input; RoiAlign needs >= 16)
MAX_BATCH = 64
MAX_SIDE = 4096


def _example_inputs(size_divisible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B=2 with two different H, W (and H != W), so no dimension specialises to a constant."""
    d = size_divisible
    h, w = 10 * d, 13 * d
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, h, w, generator=g)
    image_sizes = torch.tensor([[h, w], [h - d, w - 2 * d - 3]], dtype=torch.int64)
    return images, image_sizes


def _dynamic_shapes(size_divisible: int) -> dict[str, dict[int, Any]]:
    Dim = torch.export.Dim
    b = Dim("B", min=1, max=MAX_BATCH)
    # H, W are multiples of size_divisible (the transform pads so); saying so lets torch.export
    # prove FPN shape arithmetic (H / 32 exact) without guards that would pin the sizes.
    h = size_divisible * Dim("H_blocks", min=1, max=MAX_SIDE // size_divisible)
    w = size_divisible * Dim("W_blocks", min=1, max=MAX_SIDE // size_divisible)
    return {"images": {0: b, 2: h, 3: w}, "image_sizes": {0: b}}


def graph_metadata(cfg, class_names: list[str], *, with_nms: bool, max_detections: int,
                   model_name: str = "") -> contract.GraphMetadata:
    rh = cfg.roi_heads
    return contract.GraphMetadata(
        flavour="nms" if with_nms else "raw",
        class_names=list(class_names),
        input_settings=dataclasses.asdict(cfg.transform),
        postprocess={"score_thresh": rh.score_thresh, "nms_thresh": rh.nms_thresh,
                     "detections_per_img": max_detections if with_nms else rh.detections_per_img,
                     "min_size": rh.min_size},
        model_name=model_name,
        config=cfg.to_dict(),
        max_detections=max_detections if with_nms else None,
    )


def _name_dims(proto: onnx.ModelProto, specs: list[contract.TensorSpec], values, fixed: dict[str, int]) -> None:
    """Write the contract's dims on graph inputs/outputs: names (B, H, W, R) for dynamic dims, values
    for fixed ones (`fixed` gives the model's C)."""
    for spec, value in zip(specs, values, strict=True):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.dims):
            raise ValueError(f"{spec.name}: rank {len(dims)} != contract {spec.dims}")
        for dim, want in zip(dims, spec.dims, strict=True):
            want = fixed.get(want, want)
            if dim.HasField("dim_value") and dim.dim_value != want:
                raise ValueError(f"{spec.name}: dim {dim.dim_value} != contract {want} ({spec.dims})")
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def build_graph(net: torch.nn.Module, cfg, class_names: list[str], *, opset: int = 18,
                with_nms: bool = False, max_detections: int = 100, model_name: str = "") -> onnx.ModelProto:
    """Trace `net` (a model.FasterRCNN) into a checked, optimised ONNX model with metadata."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: the op lowerings need opset >= {MIN_OPSET}")
    net = net.eval()
    if with_nms:
        rh = cfg.roi_heads
        wrapper = NmsGraph(net, score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh,
                           min_size=rh.min_size, max_detections=max_detections)
    else:
        wrapper = RawGraph(net)
    outputs = contract.output_specs(with_nms=with_nms, max_detections=max_detections)
    sd = cfg.transform.size_divisible
    with torch.no_grad():
        # torch.export first, so a dimension the model pins (a Python int taken from a shape) fails
        # here; torch.onnx.export alone would fall back to a draft export that is right at one batch size
        t0 = time.perf_counter()
        exported = torch.export.export(wrapper.eval(), _example_inputs(sd), dynamic_shapes=_dynamic_shapes(sd),
                                       strict=False)
        _drop_runtime_asserts(exported)
        # the RPN's NMS with images on NonMaxSuppression's batch dimension (one group per FPN level)
        levels = len(net.rpn.anchor_generator.num_anchors_per_location())
        if route_rpn_nms(exported, levels) != 1:
            raise RuntimeError("expected exactly one RPN batched_nms call in the traced detector")
        t1 = time.perf_counter()
        program = torch.onnx.export(
            exported,
            dynamo=True,
            custom_translation_table=translation_table(),
            input_names=list(contract.INPUT_NAMES),
            output_names=[s.name for s in outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    t2 = time.perf_counter()
    _optimize(program)
    log.info("torch.export %.1fs, to ONNX %.1fs, optimise %.1fs", t1 - t0, t2 - t1, time.perf_counter() - t2)
    proto = program.model_proto
    merge_float_heads(proto.graph)  # the RPN's two 1x1 heads: one conv per level
    fixed = {"C": cfg.num_classes}
    _name_dims(proto, list(contract.INPUTS), proto.graph.input, fixed)
    _name_dims(proto, list(outputs), proto.graph.output, fixed)
    contract.check_output_names([o.name for o in proto.graph.output], with_nms=with_nms)
    meta = graph_metadata(cfg, class_names, with_nms=with_nms, max_detections=max_detections,
                          model_name=model_name)
    onnx.helper.set_model_props(proto, meta.to_props())
    proto.producer_name = "frcnn.export"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _drop_runtime_asserts(exported: torch.export.ExportedProgram) -> None:
    """Remove torch.export's runtime shape assertions and the symbolic arithmetic feeding them. The
    ONNX graph needs none of them; the ONNX exporter drops the assert nodes but translates their
    inputs, and a bound like `u3 <= 2**65` on a data-dependent count does not fit in an int64."""
    gm = exported.graph_module
    asserts = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
               torch.ops.aten._assert_tensor_metadata.default}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in asserts:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _optimize(program) -> None:
    """Constant folding and cleanup on the exported IR model, in place."""
    import onnxscript.optimizer

    # fold constants (weights are initializers, so shape/arange subgraphs fold), drop dead nodes,
    # merge common subexpressions; repeated until nothing changes
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    onnxscript.optimizer.optimize(program.model, num_iterations=3)
    CommonSubexpressionEliminationPass()(program.model)
    onnxscript.optimizer.optimize(program.model, num_iterations=2)
    RemoveUnusedNodesPass()(program.model)


def source_digest(checkpoint_dir: str | Path) -> str:
    """Hash of the checkpoint's files and of the export code: either changing makes a cached graph stale."""
    h = hashlib.sha256()
    files = [p for p in Path(checkpoint_dir).iterdir() if p.is_file()]
    files += list(Path(__file__).parent.rglob("*.py"))
    for f in sorted(files, key=lambda p: (p.name, str(p))):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def is_fresh(out_path: str | Path, checkpoint_dir: str | Path) -> bool:
    """True when `out_path` is an frcnn graph exported from this checkpoint by this export code."""
    out_path = Path(out_path)
    if not out_path.is_file():
        return False
    try:
        proto = onnx.load_model(str(out_path), load_external_data=False)
        meta = contract.GraphMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    except Exception:  # unreadable or foreign: not ours, so not fresh
        return False
    return meta.source_digest == source_digest(checkpoint_dir)


def export_onnx(checkpoint_dir: str | Path, out_path: str | Path, *, opset: int = 18, with_nms: bool = False,
                max_detections: int = 100, verify: bool = True, precision: str = "fp32",
                calib_images: str | Path | None = None, calib_count: int = 32,
                calib_method: str = "minmax") -> Path:
    """Export a checkpoint directory (model.safetensors + model.json) to `out_path` (.onnx).

    precision "fp16" or "int8" (export/precision.py) reduces the graph after tracing; int8 is
    calibrated on the first `calib_count` images of `calib_images`, and gated on the next ones
    (besides the synthetic ones every precision is gated on), with that precision's thresholds.

    The graph is written beside `out_path` under a temporary name, gated (verify=True), then renamed:
    a failed gate (export.verify.GateFailed) leaves nothing at `out_path` that looks verified, and two
    processes exporting at once never read half a file."""
    from model.checkpoint import load_checkpoint

    net, meta = load_checkpoint(checkpoint_dir)
    cfg = meta.config
    proto = build_graph(net, cfg, meta.class_names, opset=opset, with_nms=with_nms,
                        max_detections=max_detections, model_name=Path(checkpoint_dir).name)
    props = {p.key: p.value for p in proto.metadata_props}
    props[contract.META_SOURCE_DIGEST] = json.dumps(source_digest(checkpoint_dir))
    onnx.helper.set_model_props(proto, props)
    gate_images = None
    if precision != "fp32":
        from export.precision import calibration_feeds, to_precision
        from runtime.images import list_images, load_image
        from runtime.pipeline import Pipeline

        feeds = None
        if precision == "int8":
            if calib_images is None:
                raise ValueError("--precision int8 needs --calib-images DIR (real images, e.g. training photos)")
            paths = list_images(calib_images)
            calib, held_out = paths[:calib_count], paths[calib_count:calib_count + 8]
            pipe = Pipeline.from_model(net, cfg, meta.class_names, name=Path(checkpoint_dir).name)
            feeds = calibration_feeds(pipe, (load_image(p) for p in calib))
            gate_images = [load_image(p) for p in held_out] or None
        proto = to_precision(proto, precision, feeds=feeds, method=calib_method)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.part-", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a graph is read by other users (containers)
    try:
        onnx.save_model(proto, str(tmp_path))
        if verify:
            from export.verify import quick_verify
            from runtime.pipeline import Pipeline

            reference = Pipeline.from_model(net, cfg, meta.class_names, name=Path(checkpoint_dir).name)
            quick_verify(reference, out_path, other=Pipeline.load(tmp_path), real_images=gate_images)
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    log.info("wrote %s (%d nodes, %.1f MB)", out_path, len(proto.graph.node), out_path.stat().st_size / 2**20)
    return out_path
