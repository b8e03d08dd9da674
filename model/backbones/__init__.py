"""Backbones: a body (C2..C5 or a single map) optionally followed by an FPN.

Every backbone returns an ordered dict of feature maps keyed "0", "1", ... (finest first, plus
"pool" for the FPN's P6), exposes ``out_channels`` and the stride of each returned map.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from model.backbones.fpn import FPN
from model.backbones.mobilenet import MobileNetV3Body
from model.backbones.norm import FrozenBatchNorm2d, make_norm
from model.backbones.padding import PaddingMask
from model.backbones.resnet import ResNetBody
from model.backbones.tiny import TinyBody
from model.backbones.vgg import VGG16Body
from model.config import BackboneConfig

__all__ = ["Backbone", "build_backbone", "FrozenBatchNorm2d", "make_norm"]


class Backbone(nn.Module):
    """body (+ fpn). forward: (N, 3, H, W) -> OrderedDict[name, (N, out_channels, Hl, Wl)]."""

    def __init__(self, *, body: nn.Module, strides: list[int], fpn: FPN | None, out_channels: int,
                 pad_invariant: bool = False):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.pad_invariant = pad_invariant
        self.out_channels = out_channels
        self.names = [str(i) for i in range(len(strides))]
        self.strides = list(strides) + ([strides[-1] * 2] if fpn is not None and fpn.extra_pool else [])

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> OrderedDict[str, torch.Tensor]:
        """image_sizes (N, 2): with pad_invariant, maps are zeroed outside each image (padding.py)."""
        if not self.pad_invariant:
            feats = self.body(images)
            return OrderedDict(zip(self.names, feats)) if self.fpn is None else self.fpn(feats, self.names)
        if image_sizes is None:
            raise ValueError("a pad-invariant backbone needs the batch's image_sizes")
        mask = PaddingMask(image_sizes)
        feats = self.body(images, mask)
        if self.fpn is None:
            return OrderedDict(zip(self.names, feats))
        return self.fpn(feats, self.names, mask, self.strides[: len(self.names)])


def build_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.name in ("resnet50", "resnet101"):
        body, strides = ResNetBody(depth=cfg.name, norm=cfg.norm), [4, 8, 16, 32]
    elif cfg.name == "mobilenet_v3_large":
        body, strides = MobileNetV3Body(norm=cfg.norm), [32, 32]
    elif cfg.name == "vgg16":
        body, strides = VGG16Body(norm=cfg.norm), [16]
    elif cfg.name == "tiny":
        body, strides = TinyBody(norm=cfg.norm), [4, 8, 16, 32]
    else:
        raise ValueError(f"unknown backbone {cfg.name!r}")
    if cfg.pad_invariant and cfg.name != "tiny":
        raise ValueError("backbone.pad_invariant is implemented for the tiny backbone only")
    if not cfg.fpn:
        return Backbone(body=body, strides=strides, fpn=None, out_channels=body.out_channels_list[-1],
                        pad_invariant=cfg.pad_invariant)
    fpn = FPN(in_channels=body.out_channels_list, out_channels=cfg.out_channels, extra_pool=cfg.extra_pool)
    return Backbone(body=body, strides=strides, fpn=fpn, out_channels=cfg.out_channels,
                    pad_invariant=cfg.pad_invariant)
