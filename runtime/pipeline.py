"""One inference pipeline: preprocess -> backend -> class-wise NMS postprocess.

The same code serves ``python -m runtime``, export verification and the server. Preprocessing is
split in ``prepare`` (one image: normalize + resize, thread-safe) and ``collate`` (pad into a batch)
so a server can prepare images as they arrive and batch them later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.postprocess import Detections, RawDetections, postprocess
from model.transform import ImageBatch, normalize_resize, pad_batch

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class PreparedImage:
    tensor: torch.Tensor  # (3, h', w') float32, normalized and resized, not padded
    image_size: tuple[int, int]  # (h', w')
    original_size: tuple[int, int]  # (h, w)


@dataclass(frozen=True)
class PostOptions:
    score_threshold: float = 0.05
    max_detections: int = 100
    classes: frozenset[int] | None = None  # keep only these label ids; None keeps all


def backend_for(path: Path, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if path.suffix == ".onnx":
        return "onnxruntime"
    if path.suffix in (".engine", ".plan"):
        return "tensorrt"
    return "torch"


def load_backend(path: Path, backend: str, *, device: str = "cpu", intra_op_threads: int | None = None) -> Any:
    kind = backend_for(path, backend)
    if kind == "torch":
        from runtime.backends.torch_backend import TorchBackend

        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        return TorchBackend(path, device=device)
    if kind == "onnxruntime":
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, intra_op_threads=intra_op_threads)
    from runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path)


class Pipeline:
    def __init__(self, backend: Any, config: ModelConfig, class_names: list[str], model_name: str):
        self.backend = backend
        self.config = config
        self.class_names = class_names
        self.model_name = model_name

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto", device: str = "cpu",
             intra_op_threads: int | None = None) -> Pipeline:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}")
        b = load_backend(path, backend, device=device, intra_op_threads=intra_op_threads)
        return cls(b, b.config, list(b.class_names), path.stem if path.is_file() else path.name)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def input_settings(self) -> dict[str, Any]:
        t = self.config.transform
        return {"min_size": t.min_size, "max_size": t.max_size, "image_mean": list(t.image_mean),
                "image_std": list(t.image_std), "size_divisible": t.size_divisible}

    def prepare(self, image: np.ndarray | torch.Tensor) -> PreparedImage:
        """image: (h, w, 3) uint8 RGB array, or a (3, h, w) tensor -> PreparedImage."""
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {image.shape} {image.dtype}")
            image = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        with torch.inference_mode():
            t = normalize_resize(image, self.config.transform)
        return PreparedImage(t, (t.shape[1], t.shape[2]), (image.shape[1], image.shape[2]))

    def collate(self, items: list[PreparedImage]) -> ImageBatch:
        t = self.config.transform
        batch, sizes = pad_batch([p.tensor for p in items], t.size_divisible, t.pad_past_edge)
        original = torch.tensor([p.original_size for p in items], dtype=torch.int64)
        return ImageBatch(batch, sizes, original)

    def preprocess(self, images: list[np.ndarray | torch.Tensor]) -> ImageBatch:
        return self.collate([self.prepare(im) for im in images])

    def infer(self, batch: ImageBatch) -> RawDetections:
        return self.backend(batch.images, batch.image_sizes)

    def postprocess(self, raw: RawDetections, batch: ImageBatch,
                    options: list[PostOptions] | None = None) -> list[Detections]:
        n = batch.image_sizes.shape[0]
        options = options or [PostOptions(self.config.roi_heads.score_thresh,
                                          self.config.roi_heads.detections_per_img)] * n
        if len(options) != n:
            raise ValueError(f"{len(options)} option sets for {n} images")
        cfg = self.config.roi_heads
        return postprocess(raw, batch.image_sizes, batch.original_sizes,
                           score_thresh=[o.score_threshold for o in options], nms_thresh=cfg.nms_thresh,
                           detections_per_img=[o.max_detections for o in options], min_size=cfg.min_size,
                           classes=[None if o.classes is None else torch.tensor(sorted(o.classes), dtype=torch.int64)
                                    for o in options])

    def predict(self, images: list[np.ndarray | torch.Tensor], *, score_threshold: float | None = None,
                max_detections: int | None = None) -> list[Detections]:
        cfg = self.config.roi_heads
        opts = PostOptions(cfg.score_thresh if score_threshold is None else score_threshold,
                           cfg.detections_per_img if max_detections is None else max_detections)
        batch = self.preprocess(images)
        return self.postprocess(self.infer(batch), batch, [opts] * len(images))

