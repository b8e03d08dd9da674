"""python -m runtime over real COCO128 images with a tiny checkpoint; batching does not change results."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import build_model, preset, save_checkpoint
from runtime import Pipeline
from runtime.__main__ import main
from tests.model.parity import COCO128, ROOT, as_dict, match_rate

pytestmark = pytest.mark.skipif(not COCO128.exists(), reason="../shared/data/coco128 not found")
DEMO = ROOT / "checkpoints" / "demo-tiny-shapes"
STEMS = ["000000000009", "000000000036", "000000000049", "000000000078", "000000000086"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model(preset("tiny", num_classes=4))
    with torch.no_grad():  # peaky scores so that random weights still give detections
        net.roi_heads.box_predictor.cls_score.weight.normal_(std=0.5)
    d = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(d, net, class_names=["__background__", "a", "b", "c"])
    return d


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for s in STEMS:
        shutil.copy(COCO128 / "train2017" / f"{s}.jpg", d)
    return d


def test_cli_writes_one_entry_per_image(tiny_ckpt, image_dir, tmp_path):
    out = tmp_path / "dets.json"
    assert main(["--model", str(tiny_ckpt), "--batch-size", "2", "--score-threshold", "0.1", "--out", str(out),
                 str(image_dir)]) == 0
    res = json.loads(out.read_text())
    assert [r["image"] for r in res] == [f"{s}.jpg" for s in STEMS]
    assert (res[0]["width"], res[0]["height"]) == (640, 480)
    assert sum(len(r["boxes"]) for r in res) > 0
    for r in res:
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == len(r["label_names"])
        assert all(s > 0.1 for s in r["scores"])
        for x1, y1, x2, y2 in r["boxes"]:
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
        assert all(r["label_names"][i] == ["__background__", "a", "b", "c"][lab] for i, lab in enumerate(r["labels"]))


def test_batch_gives_the_same_detections_as_one_by_one():
    """The trained demo model (pad-invariant tiny preset) on its own kind of images: synthetic shapes
    of different sizes, every detection down to the 0.05 score threshold."""
    from train.shapes import SyntheticShapes

    pipe = Pipeline.load(DEMO, backend="torch")
    ds = SyntheticShapes(split="val", size=8, seed=123)
    images = [ds.render(i) for i in range(len(ds))]
    assert len({im.shape for im in images}) > 1, "need images of different sizes"
    single = [pipe.predict([im])[0] for im in images]
    batched = pipe.predict(images)
    assert sum(d.scores.numel() for d in single) >= len(images)
    for a, b in zip(single, batched):
        assert match_rate(as_dict(a), as_dict(b), iou=0.99, score_tol=1e-4) == 1.0
        assert match_rate(as_dict(b), as_dict(a), iou=0.99, score_tol=1e-4) == 1.0


def test_cli_reports_bad_inputs(tiny_ckpt, tmp_path, capsys):
    assert main(["--model", str(tiny_ckpt), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["--model", str(tiny_ckpt), str(bad)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing_ckpt"), str(bad)]) == 2
