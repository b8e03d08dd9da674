"""Shared, session-scoped exports: one tiny checkpoint exported once as a raw and once as a --with-nms
graph (exporting is the slow part of these tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128" / "train2017"
CLASS_NAMES = ["__background__", "circle", "square", "triangle", "star"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Randomly initialised tiny detector (5 classes): real code path, meaningless but plentiful boxes.

    The heads get wider weights than their training init (std 0.01) so objectness and class scores
    spread out: near-ties would make the RPN's top-k and NMS choices arbitrary, in any runtime."""
    import model

    torch.manual_seed(0)
    cfg = model.preset("tiny", num_classes=len(CLASS_NAMES))
    net = model.build_model(cfg).eval()
    with torch.no_grad():
        net.rpn.head.cls_logits.weight.normal_(std=0.5)
        net.rpn.head.bbox_pred.weight.normal_(std=0.05)
        net.roi_heads.box_predictor.cls_score.weight.normal_(std=0.1)
        net.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    model.save_checkpoint(out, net, cfg, CLASS_NAMES, provenance={"source": "tests/export"})
    return out


@pytest.fixture(scope="session")
def tiny_net(tiny_checkpoint):
    from model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx", verify=False)


@pytest.fixture(scope="session")
def tiny_nms_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny_nms.onnx", with_nms=True,
                       max_detections=20, verify=False)


@pytest.fixture(scope="session")
def coco_images() -> list[torch.Tensor]:
    """Four COCO128 photos as (3, h, w) uint8 (different sizes and aspect ratios)."""
    from export.verify import list_images, load_images

    if not COCO.is_dir():
        pytest.skip(f"{COCO} not found (needs ../shared/data)")
    return load_images(list_images(COCO, limit=4))
