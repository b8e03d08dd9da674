"""The HTTP contract without a model: the real app and server over a Pipeline whose backend is a fake
with known answers (create_app's `pipeline=` seam). The end-to-end tests with real models stay; these
pin what /detect does with whatever the backend says: rescaling to original pixels, thresholds,
class filters, top-k, order of images, the model facts /model reports."""

from __future__ import annotations

import httpx
import pytest
import torch
from srv_helpers import jpeg_bytes, serve

import model
from model.postprocess import RawDetections
from runtime import Pipeline

CLASSES = ["__background__", "cat", "dog"]


class KnownBackend:
    """Per image two RoIs: 'cat' 0.9 on the top-left quarter, 'dog' 0.6 on the bottom-right quarter
    (resized-image pixels; the pipeline must rescale them)."""

    name = "known"
    precision = "int8"

    def __init__(self, config):
        self.config, self.class_names, self.calls = config, CLASSES, []

    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor) -> RawDetections:
        self.calls.append(tuple(images.shape))
        rows, scores, boxes = [], [], []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            for label, score, box in ((1, 0.9, [0, 0, w / 2, h / 2]), (2, 0.6, [w / 2, h / 2, w, h])):
                s = torch.zeros(3)
                s[label], s[0] = score, 1 - score
                rows.append(i)
                scores.append(s)
                boxes.append(torch.tensor(box).expand(3, 4))
        return RawDetections(torch.tensor(rows), torch.stack(scores), torch.stack(boxes).float())


@pytest.fixture(scope="module")
def fake_live(make_settings):
    cfg = model.preset("tiny", num_classes=len(CLASSES))
    backend = KnownBackend(cfg)
    pipe = Pipeline(backend, cfg, CLASSES, "known-model")
    from server import create_app

    settings = make_settings(score_threshold=0.5)
    with serve(settings, app=create_app(settings, pipeline=pipe)) as (url, _):
        yield url, backend


def _dets(body, i=0):
    return [(d["label"], d["score"], d["box"]) for d in body["results"][i]["detections"]]


def test_boxes_come_back_in_original_pixels(fake_live):
    url, _ = fake_live
    r = httpx.post(f"{url}/detect", files={"image": ("a.jpg", jpeg_bytes((640, 480)), "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["width"] == 640 and body["results"][0]["height"] == 480
    assert _dets(body) == [("cat", 0.9, [0.0, 0.0, 320.0, 240.0]), ("dog", 0.6, [320.0, 240.0, 640.0, 480.0])]


def test_thresholds_classes_and_top_k(fake_live):
    url, _ = fake_live
    files = {"image": ("a.jpg", jpeg_bytes((200, 100)), "image/jpeg")}
    assert [d[0] for d in _dets(httpx.post(f"{url}/detect?score_threshold=0.7", files=files).json())] == ["cat"]
    assert [d[0] for d in _dets(httpx.post(f"{url}/detect?classes=dog", files=files).json())] == ["dog"]
    assert [d[0] for d in _dets(httpx.post(f"{url}/detect?classes=2", files=files).json())] == ["dog"]
    assert [d[0] for d in _dets(httpx.post(f"{url}/detect?max_detections=1", files=files).json())] == ["cat"]
    assert _dets(httpx.post(f"{url}/detect?score_threshold=0.95", files=files).json()) == []


def test_images_answer_in_order_and_model_facts(fake_live):
    url, backend = fake_live
    sizes = [(300, 200), (200, 300), (300, 200)]
    files = [("images", (f"{i}.jpg", jpeg_bytes(s), "image/jpeg")) for i, s in enumerate(sizes)]
    body = httpx.post(f"{url}/detect", files=files, timeout=30).json()
    assert [(r["image"], r["width"], r["height"]) for r in body["results"]] == [
        ("0.jpg", 300, 200), ("1.jpg", 200, 300), ("2.jpg", 300, 200)]
    for i, (w, h) in enumerate(sizes):
        assert _dets(body, i)[0] == ("cat", 0.9, [0.0, 0.0, w / 2, h / 2])
    info = httpx.get(f"{url}/model").json()
    assert (info["name"], info["backend"], info["classes"], info["precision"]) == (
        "known-model", "known", CLASSES, "int8")
