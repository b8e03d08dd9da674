"""Shared helpers for torchvision-parity tests: the stand-in R50 weights and the matching rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from model.ops import box_iou

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = {"resnet50_fpn": FIXTURES / "tv_r50_golden.safetensors",
          "mobilenet_v3_large_fpn": FIXTURES / "tv_mnv3_golden.safetensors"}


def golden(arch: str = "resnet50_fpn") -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision's outputs (tools/make_golden_model.py) and the image stems they are for."""
    with safe_open(str(GOLDEN[arch]), framework="pt") as f:
        names = json.loads(f.metadata()["images"])
    return load_file(str(GOLDEN[arch])), names


def parity_state_dict(arch: str = "resnet50_fpn") -> dict[str, torch.Tensor]:
    """The stand-in torchvision-layout weights the golden values were made with."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from parity_weights import parity_state_dict as make
    finally:
        sys.path.pop(0)
    return make(arch)


def load_coco_image(stem: str) -> torch.Tensor:
    """(3, h, w) uint8 RGB."""
    path = COCO128 / "train2017" / f"{stem}.jpg"
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def match_rate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, iou: float = 0.95,
               score_tol: float = 0.02) -> float:
    """Fraction of detections in a with a detection in b of the same label, IoU >= iou and score
    within score_tol. Detections as dicts of boxes (n, 4), scores (n,), labels (n,)."""
    n = a["scores"].numel()
    if n == 0:
        return 1.0 if b["scores"].numel() == 0 else 0.0
    if b["scores"].numel() == 0:
        return 0.0
    ious = box_iou(a["boxes"].float(), b["boxes"].float())  # (n, m)
    ok = (ious >= iou) & (a["labels"][:, None] == b["labels"][None, :]) & (
        (a["scores"][:, None] - b["scores"][None, :]).abs() <= score_tol)
    return ok.any(dim=1).float().mean().item()


def as_dict(det) -> dict[str, torch.Tensor]:
    return {"boxes": det.boxes, "scores": det.scores, "labels": det.labels}


def golden_dets(g: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {"boxes": g[f"{key}/boxes"], "scores": g[f"{key}/scores"], "labels": g[f"{key}/labels"]}
