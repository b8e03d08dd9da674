"""A Triton Inference Server model repository for an exported .onnx or .engine.

    python -m export triton --model model.onnx --repo deploy/triton --name frcnn

Writes REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx (or model.plan), REPO/NAME/labels.txt and
REPO/NAME/frcnn.json (the graph metadata: class names, preprocessing, postprocess settings).

Batching: a --with-nms graph has every output batch-major with fixed K ([B, K, 4], [B, K], [B, K],
[B]), so Triton's dynamic batcher can stack requests and split the outputs back per request
(max_batch_size > 0). A raw graph's outputs are RoI-major with a data-dependent R
(batch_idx [R], scores [R, C], boxes [R, C, 4]): Triton cannot split them per request, so a raw
graph gets max_batch_size 0, explicit batch dims and no dynamic batcher -- clients send whole
batches and run model.postprocess themselves. Prefer the --with-nms graph for Triton.
Requests are only stacked when their shapes agree: clients should pad every image to one size
(e.g. 1024 x 1024 for min 600 / max 1000: 608 x 1024 and 1024 x 608 both fit); image_sizes
keeps the padding out of the results. Boxes come back in resized-image pixels (scale by
original / image_sizes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from runtime.contract import INPUTS, GraphMetadata, TensorSpec, output_specs

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
    cfg = config_pbtxt(meta, name=name, platform=platform, max_batch_size=max_batch_size,
                       instances=instances, kind=kind)
    (model_dir / "config.pbtxt").write_text(cfg)
    (model_dir / "labels.txt").write_text("\n".join(meta.class_names) + "\n")
    (model_dir / "frcnn.json").write_text(json.dumps(meta.to_props(), indent=2) + "\n")
    return model_dir / "config.pbtxt"
