"""Validation honours the model config: every postprocess threshold (`--set roi_heads.nms_thresh=...`
and friends) reaches training-time evaluation and the export gate, through runtime.Pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import apply_overrides
from runtime import Pipeline
from train.evaluate import evaluate_model, predict_dataset
from train.shapes import SyntheticShapes

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-shapes"


@pytest.fixture(scope="module")
def demo():
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} missing (make demo-model)")
    net, meta = load_checkpoint(DEMO)
    return net.eval(), meta


@pytest.fixture(scope="module")
def val():
    return SyntheticShapes(split="val", size=6, seed=3)


def _per_image(results: list[dict]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in results:
        out[r["image_id"]] = out.get(r["image_id"], 0) + 1
    return out


def test_nms_thresh_reaches_validation(demo, val):
    net, meta = demo
    cfg = apply_overrides(meta.config, ["roi_heads.score_thresh=0.01"])
    loose = apply_overrides(cfg, ["roi_heads.nms_thresh=0.95"])
    n_default = len(predict_dataset(net, cfg, val, batch_size=2))
    n_loose = len(predict_dataset(net, loose, val, batch_size=2))
    assert n_loose > n_default  # fewer boxes suppressed: the override arrived
    # ... and equals what the served pipeline gives with the same config, image by image
    pipe = Pipeline.from_model(net, loose, val.class_names)
    want = sum(len(d.scores) for d in pipe.predict([val[i][0] for i in range(len(val))]))
    assert n_loose == want
    ap = evaluate_model(net, cfg, val, batch_size=2)["AP50"]
    ap_loose = evaluate_model(net, loose, val, batch_size=2)["AP50"]
    assert ap != ap_loose  # duplicates kept at IoU 0.95 are false positives: the metric moves


def test_detections_per_img_and_min_size_reach_validation(demo, val):
    net, meta = demo
    cfg = apply_overrides(meta.config, ["roi_heads.score_thresh=0.01", "roi_heads.detections_per_img=2"])
    assert max(_per_image(predict_dataset(net, cfg, val)).values()) == 2
    huge = dataclasses.replace(cfg, roi_heads=dataclasses.replace(cfg.roi_heads, min_size=10_000.0))
    assert predict_dataset(net, huge, val) == []


def test_the_export_gate_postprocesses_with_the_checkpoint_config(demo, val):
    """export.verify.compare runs both sides through Pipeline.postprocess: a checkpoint trained with
    `--set roi_heads.nms_thresh=0.95` is gated with that threshold."""
    from export.verify import compare

    net, meta = demo
    images = [val[i][0] for i in range(3)]
    counts = []
    for nms in (0.5, 0.95):
        cfg = apply_overrides(meta.config, ["roi_heads.score_thresh=0.01", f"roi_heads.nms_thresh={nms}"])
        ref, other = Pipeline.from_model(net, cfg, val.class_names), Pipeline.from_model(net, cfg, val.class_names)
        report, dets, _ = compare(ref, other, images)
        assert report.match_rate == 1.0
        want = ref.predict(images)
        assert [len(d.scores) for d in dets] == [len(d.scores) for d in want]
        counts.append(report.detections_torch)
    assert counts[1] > counts[0]
    torch.testing.assert_close(torch.tensor(counts[0]), torch.tensor(sum(
        len(d.scores) for d in Pipeline.from_model(net, meta.config, val.class_names).predict(
            images, Pipeline.from_model(net, meta.config, val.class_names).options(score_threshold=0.01)))))
