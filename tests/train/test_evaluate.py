"""COCO evaluation: equality with pycocotools' published figures, and the in-memory path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.coco import METRIC_KEYS, coco_metrics, detections_to_coco
from train.evaluate import evaluate_files

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FAKE100 = DATA / "cocoeval-fake100"
needs_data = pytest.mark.skipif(not FAKE100.exists(), reason="../shared/data not present")


@needs_data
def test_fake100_matches_pycocotools(tmp_path):
    out = tmp_path / "m.json"
    m = evaluate_files(FAKE100 / "instances_val2014_100.json",
                       FAKE100 / "instances_val2014_fakebbox100_results.json", out)
    # val2014_fake_eval_res.txt (COCO's own check), printed to 3 decimals
    expected = {"AP": 0.505, "AP50": 0.697, "AP75": 0.573, "APs": 0.586, "APm": 0.519, "APl": 0.501,
                "AR1": 0.387, "AR10": 0.594, "AR100": 0.595}
    for k, v in expected.items():
        assert round(m[k], 3) == v, k
    assert json.loads(out.read_text()) == m


@needs_data
def test_cli_prints_metrics(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "train", "evaluate", "--annotations", str(FAKE100 / "instances_val2014_100.json"),
         "--detections", str(FAKE100 / "instances_val2014_fakebbox100_results.json")],
        cwd=repo, capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout)
    assert round(m["AP"], 3) == 0.505 and round(m["AP50"], 3) == 0.697 and round(m["AP75"], 3) == 0.573


def _gt():
    return {"images": [{"id": 7, "width": 100, "height": 80}, {"id": 9, "width": 50, "height": 50}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
                {"id": 2, "image_id": 9, "category_id": 5, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0}],
            "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}]}


class _Det:
    def __init__(self, boxes, scores, labels):
        self.boxes, self.scores, self.labels = torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels)


def test_in_memory_perfect_and_mapping():
    # labels 1, 2 map to COCO category ids 3, 5; xyxy -> xywh
    dets = [_Det([[10.0, 10.0, 50.0, 40.0]], [0.9], [1]), _Det([[0.0, 0.0, 20.0, 20.0]], [0.8], [2])]
    results = detections_to_coco(dets, [7, 9], [0, 3, 5])
    assert results[0] == {"image_id": 7, "category_id": 3, "bbox": [10.0, 10.0, 40.0, 30.0], "score": 0.9}
    m = coco_metrics(_gt(), results)
    assert set(METRIC_KEYS) <= set(m)
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0)


def test_wrong_class_scores_zero_and_empty_is_zero():
    dets = [_Det([[10.0, 10.0, 50.0, 40.0]], [0.9], [2]), _Det([[0.0, 0.0, 20.0, 20.0]], [0.8], [1])]
    assert coco_metrics(_gt(), detections_to_coco(dets, [7, 9], [0, 3, 5]))["AP50"] == pytest.approx(0.0)
    assert coco_metrics(_gt(), [])["AP"] == 0.0
