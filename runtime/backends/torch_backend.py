"""The PyTorch backend: runs the project's own model, from a checkpoint or in memory."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.postprocess import RawDetections


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, model: torch.nn.Module, config: ModelConfig, class_names: list[str], *,
                 device: str | torch.device | None = None, channels_last: bool = False,
                 provenance: dict | None = None):
        """model: a model.FasterRCNN, run in eval mode; device None = where its parameters are."""
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        # oneDNN (CPU) and cuDNN tensor cores run convolutions faster on NHWC tensors.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=self.memory_format)
        self.config = config
        self.class_names = list(class_names)
        self.provenance = provenance or {}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: str = "cpu", channels_last: bool = True
                        ) -> TorchBackend:
        model, meta = load_checkpoint(checkpoint, map_location=torch.device(device))
        return cls(model.eval(), meta.config, meta.class_names, device=device, channels_last=channels_last,
                   provenance=meta.provenance)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor) -> RawDetections:
        was_training = self.model.training
        self.model.eval()
        try:
            images = images.to(self.device).contiguous(memory_format=self.memory_format)
            raw = self.model(images, image_sizes.to(self.device))
        finally:
            self.model.train(was_training)
        return RawDetections(*(t.cpu() for t in raw))
