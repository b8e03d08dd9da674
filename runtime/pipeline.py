"""The one inference pipeline: preprocess -> backend -> class-wise NMS postprocess.

Every caller runs inference through here: ``python -m runtime``, training-time evaluation, export
verification, the server and the benchmarks. Preprocessing is split in ``prepare`` (one image:
normalize + resize, thread-safe) and ``collate`` (pad into a batch) so a server can prepare images
as they arrive and batch them later. ``postprocess`` is the one place that turns the model config's
thresholds into ``model.postprocess`` arguments.

Batching rule: an image's answer must not depend on its batch, and torchvision architectures change
detections near the padding, so callers batch only images of the same padded size
(``same_size_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.postprocess import Detections, RawDetections, postprocess
from model.transform import ImageBatch, normalize_resize, pad_batch, resized_size
from runtime import fast_post, fast_prepare
from runtime.backends import load_backend


@dataclass(frozen=True)
class PreparedImage:
    # (3, h', w') float32, normalized and resized; or, from the compiled path, (3, H, W): already
    # zero-padded to padded_size(image_size) with the image in the top left
    tensor: torch.Tensor
    image_size: tuple[int, int]  # (h', w')
    original_size: tuple[int, int]  # (h, w)

    def unpadded(self) -> torch.Tensor:
        """(3, h', w'): the image without any padding (a view)."""
        return self.tensor[:, : self.image_size[0], : self.image_size[1]]


@dataclass(frozen=True)
class PostOptions:
    """Per-image postprocess options (one request's). Build them with ``Pipeline.options`` so the
    defaults come from the model config."""

    score_threshold: float = 0.05
    max_detections: int = 100
    classes: frozenset[int] | None = None  # keep only these label ids; None keeps all


def padded_size(image_size: tuple[int, int], size_divisible: int, pad_past_edge: bool) -> tuple[int, int]:
    """(h', w') of one resized image -> the (H, W) pad_batch gives it alone."""
    extra = 1 if pad_past_edge else 0
    return tuple(int(math.ceil((s + extra) / size_divisible) * size_divisible) for s in image_size)  # type: ignore[return-value]


def same_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal padded size, in order of first appearance, at most batch_size each.
    A batch of equal-size images gives every image exactly its one-image answer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(tuple(s), []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


class Pipeline:
    def __init__(self, backend: Any, config: ModelConfig, class_names: list[str], model_name: str):
        self.backend = backend
        self.config = config
        self.class_names = list(class_names)
        self.model_name = model_name

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto", device: str = "cpu",
             threads: int | None = None, providers: list[str] | None = None,
             winograd: bool | None = None) -> Pipeline:
        """path: checkpoint directory (torch, on `device`), .onnx (onnxruntime, on `providers`; None =
        the best available; winograd: see OnnxRuntimeBackend), .engine (tensorrt)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}")
        b = load_backend(path, backend, device=device, threads=threads, providers=providers, winograd=winograd)
        return cls(b, b.config, list(b.class_names), path.stem if path.is_file() else path.name)

    @classmethod
    def from_model(cls, net: torch.nn.Module, config: ModelConfig, class_names: list[str], *,
                   name: str = "model") -> Pipeline:
        """An in-memory model.FasterRCNN (training, export verification), run where its weights are."""
        from runtime.backends.torch_backend import TorchBackend

        return cls(TorchBackend(net, config, class_names), config, class_names, name)

    # -- facts ------------------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return str(getattr(self.backend, "precision", "fp32"))

    @property
    def input_settings(self) -> dict[str, Any]:
        t = self.config.transform
        return {"min_size": t.min_size, "max_size": t.max_size, "image_mean": list(t.image_mean),
                "image_std": list(t.image_std), "size_divisible": t.size_divisible}

    def options(self, score_threshold: float | None = None, max_detections: int | None = None,
                classes: frozenset[int] | None = None) -> PostOptions:
        """PostOptions with the model config's defaults for whatever is not given."""
        rh = self.config.roi_heads
        return PostOptions(rh.score_thresh if score_threshold is None else float(score_threshold),
                           rh.detections_per_img if max_detections is None else int(max_detections),
                           classes)

    # -- the steps --------------------------------------------------------------------------------

    def bands(self) -> fast_prepare.Bands | None:
        """Preprocessing to run alongside a decode in bands (runtime.images.load_image(...,
        after=bands.rows)), then `prepare(image, bands)`; None where the compiled pass is unavailable."""
        if not fast_prepare.available():
            return None
        t = self.config.transform
        return fast_prepare.Bands(self._sizes, t.image_mean, t.image_std)

    def _sizes(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """An (h, w) image's resized size (h', w') and the padded size (H, W) it gets alone."""
        t = self.config.transform
        size = resized_size(h, w, t.min_size, t.max_size)
        return size, padded_size(size, t.size_divisible, t.pad_past_edge)

    def prepare(self, image: np.ndarray | torch.Tensor, bands: fast_prepare.Bands | None = None) -> PreparedImage:
        """image: (h, w, 3) uint8 RGB array, or a (3, h, w) uint8 / float 0..1 tensor -> PreparedImage.
        An array goes through runtime.fast_prepare's one compiled pass (normalized, resized and
        padded alone, bit-equal to torch's path) where that is available, else through torch.
        bands: `bands()` given to the decode of `image`: what it prepared alongside is finished
        (the same values); where it prepared nothing of `image`, as without it."""
        t = self.config.transform
        if bands is not None and isinstance(image, np.ndarray) and (out := bands.finish(image)) is not None:
            return PreparedImage(torch.from_numpy(out), bands.size, (image.shape[0], image.shape[1]))
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {image.shape} {image.dtype}")
            original = (image.shape[0], image.shape[1])
            size, padded = self._sizes(*original)
            out = fast_prepare.prepare_padded(image, size, padded, t.image_mean, t.image_std)
            if out is not None:
                return PreparedImage(torch.from_numpy(out), size, original)
            image = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        with torch.inference_mode():
            x = normalize_resize(image, t)
        return PreparedImage(x, (x.shape[1], x.shape[2]), (image.shape[1], image.shape[2]))

    def padded_size(self, item: PreparedImage) -> tuple[int, int]:
        """The (H, W) `item` is padded to alone; images batch together only at equal padded size."""
        t = self.config.transform
        return padded_size(item.image_size, t.size_divisible, t.pad_past_edge)

    def collate(self, items: list[PreparedImage]) -> ImageBatch:
        """Prepared images -> one zero-padded batch. Images prepared padded to one common size are
        stacked as they are (a batch of one is a view, no copy); others are padded by pad_batch."""
        t = self.config.transform
        shape = items[0].tensor.shape
        if all(p.tensor.shape == shape and tuple(shape[1:]) == self.padded_size(p) for p in items):
            batch = items[0].tensor[None] if len(items) == 1 else torch.stack([p.tensor for p in items])
            sizes = torch.tensor([p.image_size for p in items], dtype=torch.int64)
        else:
            batch, sizes = pad_batch([p.unpadded() for p in items], t.size_divisible, t.pad_past_edge)
        original = torch.tensor([p.original_size for p in items], dtype=torch.int64)
        return ImageBatch(batch, sizes, original)

    def preprocess(self, images: list[np.ndarray | torch.Tensor]) -> ImageBatch:
        return self.collate([self.prepare(im) for im in images])

    def infer(self, batch: ImageBatch) -> RawDetections:
        return self.backend(batch.images, batch.image_sizes)

    def postprocess(self, raw: RawDetections, batch: ImageBatch,
                    options: PostOptions | list[PostOptions] | None = None) -> list[Detections]:
        """Class-wise NMS, score filter, top-k, boxes to original pixels. nms_thresh and min_size
        always come from the model config; per-image options from `options` (None: config defaults)."""
        n = batch.image_sizes.shape[0]
        if options is None:
            options = self.options()
        if isinstance(options, PostOptions):
            options = [options] * n
        if len(options) != n:
            raise ValueError(f"{len(options)} option sets for {n} images")
        rh = self.config.roi_heads
        args = dict(score_thresh=[o.score_threshold for o in options], nms_thresh=rh.nms_thresh,
                    detections_per_img=[o.max_detections for o in options], min_size=rh.min_size,
                    classes=[None if o.classes is None else torch.tensor(sorted(o.classes), dtype=torch.int64)
                             for o in options])
        # a served image's few hundred candidates at most: numpy, the same detections to the bit
        fast = fast_post.postprocess(raw, batch.image_sizes, batch.original_sizes, **args)
        if fast is not None:
            return fast
        # inference_mode: about 0.1 ms less dispatch per call than plain autograd-enabled ops (the
        # outputs are inference tensors, as the torch backend's raw outputs already are)
        with torch.inference_mode():
            return postprocess(raw, batch.image_sizes, batch.original_sizes, **args)

    def run(self, items: list[PreparedImage], options: PostOptions | list[PostOptions] | None = None
            ) -> list[Detections]:
        """One backend call over prepared images (the caller batches equal padded sizes)."""
        batch = self.collate(items)
        return self.postprocess(self.infer(batch), batch, options)

    def predict(self, images: list[np.ndarray | torch.Tensor], options: PostOptions | list[PostOptions] | None = None,
                *, batch_size: int | None = None) -> list[Detections]:
        """Detections for images, in order. Images are batched (up to batch_size, default all) only
        with images of the same padded size, so each answer equals its one-image answer."""
        if not images:
            return []
        prepared = [self.prepare(im) for im in images]
        opts = options if isinstance(options, list) else [options or self.options()] * len(images)
        if len(opts) != len(images):
            raise ValueError(f"{len(opts)} option sets for {len(images)} images")
        out: list[Detections | None] = [None] * len(images)
        for idx in same_size_batches([self.padded_size(p) for p in prepared], batch_size or len(images)):
            for i, d in zip(idx, self.run([prepared[i] for i in idx], [opts[i] for i in idx]), strict=True):
                out[i] = d
        return out  # type: ignore[return-value]
