"""Which file to serve with which backend, and loading it.

A checkpoint directory with backend "auto" or "onnxruntime" is exported to ONNX once and cached
under settings.cache_dir, keyed by a hash of the checkpoint's files, so a second start is fast and
a changed checkpoint is exported again. When export is not possible (the export package or
onnxruntime missing, or the export fails) "auto" falls back to the torch backend and says so.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from server.settings import Settings

log = logging.getLogger(__name__)


def export_digest(checkpoint_dir: Path) -> str:
    """Hash of the checkpoint's files and of the export code: either changing means a new export."""
    import export

    h = hashlib.sha256()
    files = [p for p in checkpoint_dir.iterdir() if p.is_file()]
    files += list(Path(export.__file__).parent.rglob("*.py"))
    for f in sorted(files):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_onnx(checkpoint_dir: Path, cache_dir: Path) -> Path:
    """Export `checkpoint_dir` to ONNX unless a cached export of the same files exists.

    A failed export leaves a `.failed` note, so that later starts with the same checkpoint and
    export code fall back at once instead of failing the same slow export again."""
    from export.onnx_export import export_onnx  # ImportError: caller falls back

    out = cache_dir / f"{checkpoint_dir.name}-{export_digest(checkpoint_dir)}.onnx"
    failed = out.with_suffix(".failed")
    if out.is_file():
        log.info("model: using cached ONNX export %s", out)
        return out
    if failed.is_file():
        raise RuntimeError(f"export failed before ({failed}): {failed.read_text().strip()}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("model: exporting %s to ONNX (first start; cached at %s)", checkpoint_dir, out)
    # Write beside the target and rename: two servers starting together never read half a file.
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".part-", suffix=".onnx", dir=cache_dir)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        export_onnx(checkpoint_dir, tmp_path)
        os.replace(tmp_path, out)
        data = tmp_path.with_name(tmp_path.name + ".data")  # external weights, if any
        if data.exists():
            os.replace(data, out.with_name(out.name + ".data"))
    except Exception as e:
        failed.write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        tmp_path.unlink(missing_ok=True)
    return out


def mark_failed(onnx_path: Path, reason: str) -> None:
    """Record that a cached export does not run, so the next start does not try it again."""
    onnx_path.with_suffix(".failed").write_text(reason + "\n")
    onnx_path.unlink(missing_ok=True)


def resolve(settings: Settings) -> tuple[Path, str]:
    """(path to load, backend name) for the settings; may export and cache an ONNX file."""
    path = settings.model_path
    if not path.exists():
        hint = " (the bundled demo checkpoint; run `make demo-model`)" if settings.model is None else ""
        raise FileNotFoundError(f"model not found: {path}{hint}")
    backend = settings.backend
    if path.is_dir() and backend in ("auto", "onnxruntime"):
        try:
            import onnxruntime  # noqa: F401

            return cached_onnx(path, settings.cache_dir), "onnxruntime"
        except Exception as e:
            if backend == "onnxruntime":
                raise RuntimeError(f"cannot export {path} to ONNX for the onnxruntime backend: {e}") from e
            log.warning("model: ONNX export unavailable (%s: %s); serving %s with the torch backend",
                        type(e).__name__, e, path)
            return path, "torch"
    if backend == "auto":
        backend = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}.get(path.suffix, "torch")
    return path, backend


def load_pipeline(settings: Settings) -> Any:
    """Resolve and load a runtime.Pipeline; "auto" on a checkpoint falls back to torch if the
    exported graph does not load."""
    from runtime import Pipeline

    if settings.intra_op_threads:
        import torch

        torch.set_num_threads(settings.intra_op_threads)
    path, backend = resolve(settings)
    kwargs: dict[str, Any] = {}
    if settings.intra_op_threads and "intra_op_threads" in inspect.signature(Pipeline.load).parameters:
        kwargs["intra_op_threads"] = settings.intra_op_threads
    exported = path != settings.model_path
    try:
        pipe = Pipeline.load(path, backend=backend, **kwargs)
        if exported:  # a graph we made ourselves must run before we serve it
            pipe.predict([np.zeros((64, 96, 3), np.uint8)])
    except Exception as e:
        if settings.backend != "auto" or not exported:
            raise
        log.warning("model: the ONNX export %s does not run (%s); serving the checkpoint with torch", path, e)
        mark_failed(path, f"{type(e).__name__}: {e}")
        path, backend = settings.model_path, "torch"
        pipe = Pipeline.load(path, backend=backend, **kwargs)
    log.info("model: %s served by the %s backend", path, getattr(pipe, "backend_name", backend))
    return pipe
