"""Pad-invariant backbones (the tiny preset): an image's detections do not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from model import build_model, preprocess, preset
from model.backbones.padding import PaddingMask, anchors_inside
from model.postprocess import postprocess
from tests.model.parity import as_dict, match_rate


def test_mask_by_hand():
    m = PaddingMask(torch.tensor([[5, 9], [8, 8]]))
    # stride 2: image 0 is 5x9 px -> ceil: 3 rows, 5 columns of an (4, 8) map
    mask = m.mask(2, 4, 8)[:, 0]
    assert mask[0].sum() == 15 and mask[0, :3, :5].all() and mask[1, :, :4].all() and mask[1].sum() == 16
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [6.0, 0.0, 14.0, 4.0]])  # centres (4, 4), (10, 2)
    assert anchors_inside(anchors, torch.tensor([[5, 11], [8, 8]])).tolist() == [[True, True], [True, False]]


def test_other_backbones_refuse_the_option():
    from model.config import apply_overrides

    with pytest.raises(ValueError, match="tiny backbone only"):
        build_model(apply_overrides(preset("resnet50_fpn"), ["backbone.pad_invariant=true"]))


def test_batched_equals_one_by_one_exactly():
    torch.manual_seed(0)
    net = build_model(preset("tiny", num_classes=4)).eval()
    with torch.no_grad():  # peaky scores so random weights still detect things
        net.roi_heads.box_predictor.cls_score.weight.normal_(std=0.5)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, hw, dtype=torch.uint8, generator=g)
              for hw in [(3, 300, 200), (3, 480, 640), (3, 200, 512), (3, 333, 333)]]
    cfg = net.config.transform

    def run(imgs):
        b = preprocess(imgs, cfg)
        with torch.no_grad():
            # no top-k cut: with random weights the 100th place is a tie that float noise decides
            return postprocess(net(b.images, b.image_sizes), b.image_sizes, b.original_sizes,
                               detections_per_img=10_000)

    batched = run(images)
    for img, det in zip(images, batched):
        alone = run([img])[0]
        assert alone.scores.numel() > 10
        a, b = as_dict(alone), as_dict(det)
        # every detection has a twin: same label, IoU >= 0.99, score within 1e-4 (order may differ
        # among these random weights' tied scores)
        assert match_rate(a, b, iou=0.99, score_tol=1e-4) == 1.0
        assert match_rate(b, a, iou=0.99, score_tol=1e-4) == 1.0
