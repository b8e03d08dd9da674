"""INT8 entropy calibration for the TensorRT builder: calibration images -> device batches.

Images go through model.transform with the graph's own input settings, padded to one fixed
(H, W) (the profile's opt shape), so calibration sees the activation ranges serving will see.
Needs TensorRT and a CUDA device (torch CUDA tensors hold the batches).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from runtime.backends.tensorrt_io import import_tensorrt

log = logging.getLogger(__name__)

trt = import_tensorrt()


class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
    def __init__(self, input_settings: dict, *, images_dir: str | None, cache_path: str | None,
                 batch_size: int, hw: tuple[int, int], max_batches: int = 16):
        super().__init__()
        self.settings = input_settings
        self.cache_path = Path(cache_path) if cache_path else None
        self.batch_size = int(batch_size)
        self.hw = (int(hw[0]), int(hw[1]))
        self.paths: list[Path] = []
        if images_dir:
            from export.verify import list_images

            self.paths = list_images(images_dir, limit=self.batch_size * max_batches)
        self._next = 0
        self._device: dict[str, torch.Tensor] = {}

    def get_batch_size(self) -> int:
        return self.batch_size

    def _batch(self, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        from export.verify import load_images
        from model.config import TransformConfig
        from model.transform import normalize_resize

        cfg = TransformConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items()})
        h, w = self.hw
        images = torch.zeros((len(paths), 3, h, w))
        sizes = torch.zeros((len(paths), 2), dtype=torch.int64)
        for i, img in enumerate(load_images(paths)):
            x = normalize_resize(img, cfg)[:, :h, :w]  # cropped if the profile's opt size is smaller
            images[i, :, : x.shape[1], : x.shape[2]] = x
            sizes[i] = torch.tensor(x.shape[1:])
        return images, sizes

    def get_batch(self, names: list[str]) -> list[int] | None:
        if self._next + self.batch_size > len(self.paths):
            return None
        images, sizes = self._batch(self.paths[self._next:self._next + self.batch_size])
        self._next += self.batch_size
        self._device = {"images": images.cuda().contiguous(), "image_sizes": sizes.cuda().contiguous()}
        log.info("calibration batch %d", self._next // self.batch_size)
        return [int(self._device[n].data_ptr()) for n in names]

    def read_calibration_cache(self) -> bytes | None:
        if self.cache_path is not None and self.cache_path.exists():
            return self.cache_path.read_bytes()
        return None

    def write_calibration_cache(self, cache) -> None:
        if self.cache_path is not None:
            self.cache_path.write_bytes(bytes(cache))
