"""Parity of model/ops with torchvision, through tests/fixtures/ops_golden.safetensors.

The fixture holds seeded inputs and torchvision 0.28's outputs (tools/make_golden_ops.py, run in
the reference venv), so these tests need no torchvision. Regenerate it only on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.ops import batched_nms, box_iou, multiscale_roi_align, nms, roi_align, roi_pool

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "ops_golden.safetensors"
ATOL = 1e-5  # RoIAlign: same samples and weights, only the summation order differs


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} missing: run .refvenv/bin/python tools/make_golden_ops.py")
    with safe_open(str(GOLDEN), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k not in ("torch", "torchvision")}
    return load_file(str(GOLDEN)), meta


@pytest.mark.parametrize("case", ["nms_random", "nms_rpn"])
def test_nms_matches_torchvision(golden, case):
    t, meta = golden
    keep = nms(t[f"{case}.boxes"], t[f"{case}.scores"], meta[case]["iou_threshold"])
    assert torch.equal(keep, t[f"{case}.keep"])


def test_batched_nms_matches_torchvision(golden):
    t, meta = golden
    keep = batched_nms(t["batched_nms.boxes"], t["batched_nms.scores"], t["batched_nms.idxs"],
                       meta["batched_nms"]["iou_threshold"])
    assert torch.equal(keep, t["batched_nms.keep"])


def test_box_iou_matches_torchvision(golden):
    t, _ = golden
    torch.testing.assert_close(box_iou(t["box_iou.boxes1"], t["box_iou.boxes2"]), t["box_iou.iou"],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_torchvision(golden, aligned, sampling_ratio):
    t, meta = golden
    p = meta["roi"]
    out = roi_align(t["roi.input"], t["roi.rois"], p["output_size"], p["spatial_scale"], sampling_ratio, aligned)
    torch.testing.assert_close(out, t[f"roi.align_{int(aligned)}_{sampling_ratio}"], rtol=0, atol=ATOL)


def test_roi_pool_matches_torchvision(golden):
    t, meta = golden
    p = meta["roi"]
    out = roi_pool(t["roi.input"], t["roi.rois"], p["output_size"], p["spatial_scale"])
    assert torch.equal(out, t["roi.pool"])  # a max picks an input value: exact


@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(False, 2), (True, 0)])
def test_roi_align_gradient_matches_torchvision(golden, aligned, sampling_ratio):
    t, meta = golden
    p = meta["grad"]
    x = t["grad.input"].clone().requires_grad_(True)
    roi_align(x, t["grad.rois"], p["output_size"], p["spatial_scale"], sampling_ratio, aligned).backward(
        t["grad.grad_output"])
    torch.testing.assert_close(x.grad, t[f"grad.input_grad_{int(aligned)}_{sampling_ratio}"], rtol=0, atol=ATOL)


def test_multiscale_roi_align_matches_torchvision(golden):
    t, meta = golden
    p = meta["msra"]
    feats = [t[f"msra.p{lvl}"] for lvl in range(2, 6)]
    out = multiscale_roi_align(feats, t["msra.rois"], p["output_size"], p["spatial_scales"], p["sampling_ratio"],
                               canonical_scale=p["canonical_scale"], canonical_level=p["canonical_level"])
    torch.testing.assert_close(out, t["msra.output"], rtol=0, atol=ATOL)
