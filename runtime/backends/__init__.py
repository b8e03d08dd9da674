"""Inference backends. Each is a callable
``backend(images: Tensor[B, 3, H, W] float32, image_sizes: Tensor[B, 2] int64) -> RawDetections``
with ``name``, ``config`` (the model's ModelConfig), ``class_names`` and ``precision``.

This module is the one home of backend resolution: which backend runs which file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
_BY_SUFFIX = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}


def resolve_backend(path: str | Path, backend: str = "auto") -> str:
    """The backend that runs `path`: a checkpoint directory -> torch, .onnx -> onnxruntime,
    .engine/.plan -> tensorrt; an explicit `backend` other than "auto" is returned as is."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return _BY_SUFFIX.get(Path(path).suffix.lower(), "torch")


def load_backend(path: str | Path, backend: str = "auto", *, device: str = "cpu",
                 threads: int | None = None, providers: list[str] | None = None,
                 winograd: bool | None = None) -> Any:
    """Load `path` with the backend resolve_backend picks (threads: intra-op threads; None = library
    default; device: the torch backend's; providers: onnxruntime's, None = the best available;
    winograd: onnxruntime's Winograd convolutions, None = on the CPU provider)."""
    path = Path(path)
    kind = resolve_backend(path, backend)
    if kind == "torch":
        import torch

        from runtime.backends.torch_backend import TorchBackend

        if threads:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch build or machine has no CUDA GPU "
                             f"(torch {torch.__version__}); use device cpu")
        return TorchBackend.from_checkpoint(path, device=device)
    if kind == "onnxruntime":
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, intra_op_threads=threads, providers=providers or None, winograd=winograd)
    from runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path)
