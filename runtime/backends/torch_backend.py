"""The PyTorch backend: runs a checkpoint with the project's own model."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.postprocess import RawDetections


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", channels_last: bool = True):
        self.device = torch.device(device)
        self.model, meta = load_checkpoint(checkpoint, map_location=self.device)
        # oneDNN (CPU) and cuDNN tensor cores run convolutions faster on NHWC tensors.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.config = meta.config
        self.class_names = meta.class_names
        self.provenance = meta.provenance

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor) -> RawDetections:
        images = images.to(self.device).contiguous(memory_format=self.memory_format)
        raw = self.model(images, image_sizes.to(self.device))
        return RawDetections(*(t.cpu() for t in raw))
