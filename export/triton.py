"""A Triton Inference Server model repository that Triton can batch.

    python -m export triton --checkpoint CKPT --repo out/triton [--name frcnn] [--max-detections 100]
    python -m export triton --model model.onnx|model.engine --repo out/triton     # an exported graph
    python -m export triton --checkpoint CKPT --repo out/triton --raw              # raw layout

Writes REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx (or model.plan), REPO/NAME/labels.txt and
REPO/NAME/frcnn.json (the graph metadata: class names, preprocessing, postprocess settings).

Default, from a checkpoint: the --with-nms graph. Its outputs are batch-major with a fixed K
(boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B]), so Triton's dynamic batcher can
stack requests and split the outputs back per request: max_batch_size > 0, preferred batch sizes.
--raw (or --model with a raw graph): outputs are RoI-major with a data-dependent R (batch_idx [R],
scores [R, C], boxes [R, C, 4]); Triton cannot split them per request, so the config gets
max_batch_size 0, explicit batch dims and no dynamic batcher, and clients run model.postprocess.

Preprocessing is the client's step (Triton runs the graph only): runtime/triton_io.py's
triton_inputs() resizes, normalises and pads every image to one square (Triton only stacks equal
shapes; image_sizes keeps the padding out of the results) and triton_detections() maps the boxes
from resized-image pixels back to the original image. See deploy/triton/README.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import onnx

from runtime.contract import INPUTS, GraphMetadata, TensorSpec, output_specs

log = logging.getLogger(__name__)

_TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "float16": "TYPE_FP16"}


def _read_metadata(model_path: Path) -> GraphMetadata:
    if model_path.suffix == ".engine":
        from runtime.backends.tensorrt_io import read_sidecar

        return read_sidecar(model_path)[0]
    model = onnx.load(str(model_path), load_external_data=False)
    return GraphMetadata.from_props({p.key: p.value for p in model.metadata_props})


def _dims(spec: TensorSpec, batched: bool, num_classes: int) -> tuple[list[int], bool]:
    """Triton dims (C -> the class count, other named dims -> -1), without the batch dim when batched.
    Returns (dims, reshape_to_scalar)."""
    dims = [d if isinstance(d, int) else num_classes if d == "C" else -1 for d in spec.dims]
    if batched:
        if spec.dims[0] != "B":
            raise ValueError(f"{spec.name}: dims {spec.dims} are not batch-major")
        dims = dims[1:]
    if not dims:  # a per-item scalar: Triton wants [1] reshaped to []
        return [1], True
    return dims, False


def _tensor_block(spec: TensorSpec, batched: bool, num_classes: int) -> str:
    dims, scalar = _dims(spec, batched, num_classes)
    lines = [f'    name: "{spec.name}"', f"    data_type: {_TRITON_TYPES[spec.dtype]}", f"    dims: {dims}"]
    if scalar:
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(meta: GraphMetadata, *, name: str, platform: str, max_batch_size: int, instances: int,
                 kind: str) -> str:
    batched = meta.with_nms and max_batch_size > 0
    c = len(meta.class_names)
    outputs = output_specs(with_nms=meta.with_nms, max_detections=meta.max_detections or 0)
    parts = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [\n" + ",\n".join(_tensor_block(s, batched, c) for s in INPUTS) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s, batched, c) for s in outputs) + "\n]",
        f"instance_group [ {{ count: {instances} kind: KIND_{kind.upper()} }} ]",
    ]
    if batched:
        sizes = sorted({b for b in (1, 2, 4, 8, max_batch_size) if b <= max_batch_size})
        parts.append("dynamic_batching {\n"
                     f"  preferred_batch_size: {sizes}\n"
                     "  max_queue_delay_microseconds: 5000\n}")
    else:
        parts.append("# raw outputs (R RoIs over the batch) cannot be split per request: no dynamic batching")
    return "\n".join(parts) + "\n"


def write_model_repository(model_path: str | Path, repo: str | Path, *, name: str = "frcnn",
                           max_batch_size: int = 8, instances: int = 1, kind: str | None = None) -> Path:
    """Write the model directory REPO/NAME; returns its config.pbtxt path."""
    model_path, repo = Path(model_path), Path(repo)
    meta = _read_metadata(model_path)
    engine = model_path.suffix == ".engine"
    platform = "tensorrt_plan" if engine else "onnxruntime_onnx"
    kind = kind or ("gpu" if engine else "cpu")
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "1" / ("model.plan" if engine else "model.onnx"))
    if not meta.with_nms:
        log.warning("%s is a raw graph: Triton cannot batch it (max_batch_size 0) and clients must run the "
                    "class-wise NMS; `python -m export triton --checkpoint CKPT` writes the batchable NMS graph",
                    model_path)
    cfg = config_pbtxt(meta, name=name, platform=platform, max_batch_size=max_batch_size,
                       instances=instances, kind=kind)
    (model_dir / "config.pbtxt").write_text(cfg)
    (model_dir / "labels.txt").write_text("\n".join(meta.class_names) + "\n")
    (model_dir / "frcnn.json").write_text(json.dumps(meta.to_props(), indent=2) + "\n")
    return model_dir / "config.pbtxt"


def write_repository_from_checkpoint(checkpoint: str | Path, repo: str | Path, *, name: str = "frcnn",
                                     raw: bool = False, max_detections: int = 100, max_batch_size: int = 8,
                                     instances: int = 1, kind: str | None = None, verify: bool = True) -> Path:
    """Export `checkpoint` (the --with-nms graph unless raw; gated against the checkpoint unless
    verify=False) and write its repository REPO/NAME; returns the config.pbtxt path."""
    from export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="frcnn-triton-") as tmp:
        graph = export_onnx(checkpoint, Path(tmp) / "model.onnx", with_nms=not raw,
                            max_detections=max_detections, verify=verify)
        return write_model_repository(graph, repo, name=name, max_batch_size=max_batch_size,
                                      instances=instances, kind=kind)
