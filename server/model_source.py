"""Which file the server serves with which backend, and loading it.

The server loads finished artifacts and never exports (making an ONNX graph from a checkpoint is
`python -m export onnx`'s job; `make serve` and the container entrypoints run it when the cached graph
is missing or stale). A checkpoint directory is served by the torch backend, with a hint on how to get
the faster graph; .onnx by onnxruntime; .engine by TensorRT. Backend resolution itself lives in
runtime.backends.resolve_backend.
"""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.backends import resolve_backend
from runtime.pipeline import Pipeline
from server.settings import Settings

log = logging.getLogger(__name__)


def resolve(settings: Settings) -> tuple[Path, str]:
    """(path to load, backend name) for the settings."""
    path = settings.model_path
    if not path.exists():
        hint = " (the bundled demo checkpoint; run `make demo-model`)" if settings.model is None else ""
        raise FileNotFoundError(f"model not found: {path}{hint}")
    backend = resolve_backend(path, settings.backend)
    if path.is_dir() and backend != "torch":
        raise ValueError(f"{path} is a checkpoint directory: the {backend} backend runs an exported graph; "
                         f"make one with `python -m export onnx --checkpoint {path} --out model.onnx`")
    return path, backend


def load_pipeline(settings: Settings) -> Pipeline:
    path, backend = resolve(settings)
    pipe = Pipeline.load(path, backend=backend, threads=settings.threads, device=settings.device,
                         providers=settings.providers or None, winograd=None if settings.winograd else False)
    if path.is_dir():
        log.info("model: serving checkpoint %s with the torch backend; for onnxruntime (faster on CPU) run "
                 "`python -m export onnx --checkpoint %s --out model.onnx --if-stale` and serve model.onnx "
                 "(`make serve` does both)", path, path)
    where = {"torch": settings.device, "onnxruntime": ", ".join(getattr(pipe.backend, "providers", []))}
    convs = getattr(pipe.backend, "winograd_convs", 0)
    log.info("model: %s served by the %s backend (%s; %s%s)", path, pipe.backend_name, pipe.precision,
             where.get(pipe.backend_name, "gpu"), f"; Winograd F(4x4, 3x3) on {convs} convolutions" if convs else "")
    return pipe
