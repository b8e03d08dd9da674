"""A torchvision R50-FPN, converted and served: two photos in one request get torchvision's detections.

The weights are the deterministic stand-in of tools/parity_weights.py (no pretrained weights can be
downloaded here); tests/fixtures/tv_r50_golden.safetensors holds what torchvision itself answered
for them (tools/make_golden_model.py). Photos 000000000009 (600x800 after resizing, padded 608x800)
and 000000000036 (798x600, padded 800x608) differ in padded size, so the server runs them as two
backend calls (it batches equal padded sizes only) and each must get torchvision's answer for that
photo alone.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from srv_helpers import COCO, serve

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "tv_r50_golden.safetensors"
PHOTOS = ("000000000009", "000000000036")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def r50_checkpoint(r50_parity_checkpoint) -> Path:
    if not GOLDEN.exists():
        pytest.skip("torchvision golden fixture missing")
    return r50_parity_checkpoint


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.mark.parametrize("backend", [pytest.param("onnxruntime", marks=pytest.mark.xdist_group("r50-onnx")),
                                     "torch"])
def test_two_photos_in_one_request_match_torchvision(shared_data, r50_checkpoint, make_settings, request,
                                                    backend):
    from safetensors.torch import load_file

    model = r50_checkpoint
    if backend == "onnxruntime":  # the server serves finished artifacts: export first, as `make serve` does
        model = request.getfixturevalue("r50_parity_onnx")
    golden = load_file(str(GOLDEN))
    files = [("images", (f"{n}.jpg", (COCO / f"{n}.jpg").read_bytes(), "image/jpeg")) for n in PHOTOS]
    settings = make_settings(model=model, backend=backend, score_threshold=0.05,
                             max_detections=100, max_batch_size=2, max_delay_ms=1000, request_timeout_s=600)
    with serve(settings) as (url, _):
        r = httpx.post(f"{url}/detect", files=files, timeout=600)
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["backend"] == backend
    assert "frcnn_batch_size_count 2.0" in metrics  # two padded sizes: one backend call each
    assert 'frcnn_shape_images_total{shape="608x800"} 1.0' in metrics
    assert 'frcnn_shape_images_total{shape="800x608"} 1.0' in metrics
    for name, res in zip(PHOTOS, body["results"], strict=True):
        want_boxes, want_scores = golden[f"{name}/boxes"], golden[f"{name}/scores"]
        want_labels = golden[f"{name}/labels"]
        got_boxes = torch.tensor([d["box"] for d in res["detections"]])
        got_scores = torch.tensor([d["score"] for d in res["detections"]])
        got_labels = torch.tensor([d["label_id"] for d in res["detections"]])
        assert abs(len(got_scores) - len(want_scores)) <= 3, name
        # Every confident torchvision detection has a twin: same class, IoU > 0.97, score within 0.01.
        confident = want_scores >= 0.1
        iou = _iou(want_boxes[confident], got_boxes)
        same = (want_labels[confident][:, None] == got_labels[None, :])
        close = (want_scores[confident][:, None] - got_scores[None, :]).abs() <= 0.01
        matched = ((iou > 0.97) & same & close).any(dim=1)
        assert matched.float().mean() >= 0.95, f"{name}: {int((~matched).sum())} of {int(confident.sum())} unmatched"
        assert res["detections"][0]["label"] and res["width"] * res["height"] > 0
