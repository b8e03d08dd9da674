"""Import torchvision detection state dicts (read as plain tensors; torchvision is never imported).

Our module layout mirrors torchvision's, so conversion is a key check plus a few renames of older
layouts. Handles FrozenBN and BatchNorm variants (BatchNorm adds ``num_batches_tracked``).
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
from dataclasses import replace
from pathlib import Path

import torch

from model.coco_names import COCO_91
from model.config import ModelConfig, preset
from model.detector import FasterRCNN, build_model

ARCHS = ("resnet50_fpn", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn")

# Older torchvision releases saved these modules without the Conv2dNormActivation wrapper.
_RENAMES = [
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$"), r"backbone.fpn.\1_blocks.\2.0.\3"),
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .pth/.pt state dict (loaded with weights_only=True: no code runs) or a .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # training checkpoints of torchvision's reference scripts
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def torchvision_config(arch: str, num_classes: int, min_size: int | None = None,
                       max_size: int | None = None) -> ModelConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cfg = preset(arch, num_classes=num_classes)
    t = cfg.transform
    return replace(cfg, transform=replace(t, min_size=min_size or t.min_size, max_size=max_size or t.max_size))


def load_torchvision(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> FasterRCNN:
    """Build the model for cfg and load a torchvision state dict into it (strict: every key must match)."""
    net = build_model(cfg)
    converted = convert_state_dict(sd)
    ours = net.state_dict()
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {cfg.backbone.name}: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for k, v in converted.items():
        if ours[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(ours[k].shape)} in the model "
                             "(wrong --arch or --num-classes?)")
    net.load_state_dict(converted, strict=True)
    return net.eval()


def class_names_for(num_classes: int) -> list[str]:
    if num_classes == len(COCO_91):
        return list(COCO_91)
    return ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Fetch url (https://, file://) to dest, for users with a network, checking its sha256 (a
    prefix is accepted, as torchvision file names carry one) before anything lands at dest: a
    wrong file is deleted and raises ValueError, so nothing unverified is ever cached. A cached
    dest that no longer matches is fetched again."""
    want = sha256.lower() if sha256 else None
    if dest.exists():
        if want is None or _sha256(dest).startswith(want):
            return dest
        dest.unlink()  # damaged or replaced cache entry
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:  # noqa: S310 - user-given URL
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if want is not None and not h.hexdigest().startswith(want):
            raise ValueError(f"{url}: sha256 {h.hexdigest()} does not match the expected {want}; "
                             "the download was deleted, nothing was cached")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
