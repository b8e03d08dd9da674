"""TensorRT engine files as the runtime reads them: the import with its message, and the JSON
sidecar (graph contract, classes, profile) that `python -m export tensorrt` writes beside an engine."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.contract import GraphMetadata

SIDECAR_SUFFIX = ".json"


def import_tensorrt():
    """`import tensorrt`, with what to do when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(
            "TensorRT is not installed: the TensorRT builder and backend need a CUDA GPU and "
            "`pip install tensorrt` (TensorRT 10 or 11). The .onnx runs anywhere with onnxruntime."
        ) from e
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise ImportError(f"TensorRT {trt.__version__} found; this code targets the TensorRT 10 and 11 APIs")
    return trt


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(engine_path).with_suffix(SIDECAR_SUFFIX)


def read_sidecar(engine_path: str | Path) -> tuple[GraphMetadata, dict]:
    """(graph metadata, the whole sidecar dict) of an engine built by build_engine."""
    path = sidecar_path(engine_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the engine's sidecar (written by `python -m export tensorrt`) is missing")
    data = json.loads(path.read_text())
    return GraphMetadata.from_props(data["metadata"]), data
