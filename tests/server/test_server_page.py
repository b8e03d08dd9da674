"""The web page in headless Chromium (Debian's `chromium` package), driven over the DevTools protocol:
choose an image in the file input, and the boxes the server returned are drawn with labels and scores;
with the demo model, "try a sample" shows the model's classes and draws the generator's true boxes;
a dropped file is detected and the list stays. Screenshots go to the test's tmp_path (and to
$FRCNN_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from srv_helpers import CLASS_NAMES, serve
from websockets.sync.client import connect

from server.settings import DEMO_CHECKPOINT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (apt-get install -y chromium)")


class DevTools:
    """Minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            time.sleep(0.1)


def _launch(url: str, profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("chromium did not open its DevTools port")
        time.sleep(0.05)
    port = int(port_file.read_text().split()[0])
    while True:
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page" and t["url"].startswith(url)]
        if pages:
            return proc, pages[0]["webSocketDebuggerUrl"]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("chromium opened no page for the server")
        time.sleep(0.05)


def test_upload_draws_boxes(make_settings, coco_jpegs, tmp_path):
    photo = coco_jpegs[2]
    with serve(make_settings(max_detections=15)) as (url, _):
        want = httpx.post(f"{url}/detect", files={"images": (photo.name, photo.read_bytes(), "image/jpeg")},
                          timeout=60).json()["results"][0]
        assert want["detections"], "the test needs a model answer with boxes"
        sample_status = httpx.get(f"{url}/sample.png", timeout=30).status_code
        proc, ws_url = _launch(url + "/", tmp_path / "profile")
        try:
            with connect(ws_url, max_size=None, open_timeout=30) as ws:
                page = DevTools(ws)
                page.call("Runtime.enable")
                page.wait_for("document.readyState === 'complete' && document.getElementById('threshold').value !== ''")
                classes_text = page.eval("document.getElementById('classes').textContent")
                sample_hidden = page.eval("document.getElementById('sample').hidden")
                root = page.call("DOM.getDocument")["root"]["nodeId"]
                node = page.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
                page.call("DOM.setFileInputFiles", nodeId=node, files=[str(photo)])
                page.wait_for("document.body.dataset.state === 'done'")
                drawn = page.eval("""Array.from(document.querySelectorAll('#overlay g.detection')).map(g => {
                    const r = g.querySelector('rect.box');
                    return {box: ['x', 'y', 'width', 'height'].map(a => parseFloat(r.getAttribute(a))),
                            text: g.querySelector('text.tag').textContent};
                })""")
                view_box = page.eval("document.getElementById('overlay').getAttribute('viewBox')")
                shown = page.eval("document.getElementById('photo').naturalWidth + 'x' + "
                                  "document.getElementById('photo').naturalHeight")
                status = page.eval("document.getElementById('status').textContent")
        finally:
            proc.terminate()
            proc.wait(30)
    assert classes_text.startswith("This model detects 3 kinds of object: circlesquaretriangle.")
    assert sample_hidden is True  # no sample image for a model not made for the shapes
    assert sample_status == 404
    assert view_box == f"0 0 {want['width']} {want['height']}"
    assert shown == f"{want['width']}x{want['height']}"  # the image shown is the one the boxes refer to
    assert len(drawn) == len(want["detections"]) and f"{len(drawn)} detection(s) in {photo.name}" in status
    for d, w in zip(drawn, want["detections"], strict=True):
        x1, y1, x2, y2 = w["box"]
        assert d["box"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        label, score = d["text"].rsplit(" ", 1)
        assert label == w["label"] and label in CLASS_NAMES and float(score) == pytest.approx(w["score"], abs=0.006)


_DRAWN = """Array.from(document.querySelectorAll('#overlay g.detection')).map(g => {
    const r = g.querySelector('rect.box');
    return {box: ['x', 'y', 'width', 'height'].map(a => parseFloat(r.getAttribute(a))),
            text: g.querySelector('text.tag').textContent};
})"""
_LISTED = """Array.from(document.querySelectorAll('#table tbody tr.detection')).map(
    tr => Array.from(tr.cells).map(td => td.textContent))"""


def _assert_page_shows(drawn: list, listed: list, want: dict) -> None:
    """Boxes, tags and table rows are the server's answer, in its order."""
    assert len(drawn) == len(listed) == len(want["detections"]) > 0
    for d, row, w in zip(drawn, listed, want["detections"], strict=True):
        x1, y1, x2, y2 = w["box"]
        assert d["box"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        assert d["text"] == f"{w['label']} {w['score']:.2f}"
        assert row[0] == w["label"] and float(row[1]) == pytest.approx(w["score"], abs=5e-4)
        # JS toFixed rounds halves up, Python's format to even: compare the numbers, not the text
        assert [float(v) for v in row[2].split(", ")] == pytest.approx(w["box"], abs=0.051)


def _screenshot(page: DevTools, path: Path) -> bytes:
    png = base64.b64decode(page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    path.write_bytes(png)
    if os.environ.get("FRCNN_TEST_ARTIFACTS"):
        out = Path(os.environ["FRCNN_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_bytes(png)
    return png


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def test_first_five_minutes_sample_and_drop(make_settings, tmp_path):
    """A newcomer with the demo model: the page names the classes, one click on "try a sample" draws
    the generator's true boxes, a dropped file is detected and the detections list stays."""
    from PIL import Image

    from runtime.shapes import sample
    from server.sample import SAMPLES

    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"demo checkpoint missing at {DEMO_CHECKPOINT} (make demo-model)")
    with serve(make_settings(model=DEMO_CHECKPOINT, score_threshold=0.5)) as (url, _):
        info = httpx.get(f"{url}/model", timeout=30).json()
        assert info["sample"] == "sample.png" and info["precision"] == "fp32"
        sample0 = httpx.get(f"{url}/sample.png", params={"index": 0}, timeout=30)
        assert sample0.headers["content-type"] == "image/png"
        want = httpx.post(f"{url}/detect", files={"images": ("sample-0.png", sample0.content, "image/png")},
                          timeout=60).json()["results"][0]
        proc, ws_url = _launch(url + "/", tmp_path / "profile")
        try:
            with connect(ws_url, max_size=None, open_timeout=30) as ws:
                page = DevTools(ws)
                page.call("Runtime.enable")
                page.call("Emulation.setDeviceMetricsOverride", width=1000, height=900, deviceScaleFactor=1,
                          mobile=False)
                page.wait_for("!document.getElementById('sample').hidden")
                classes_text = page.eval("document.getElementById('classes').textContent")
                page.eval("document.getElementById('sample').click()")
                page.wait_for("document.body.dataset.state === 'done'")
                drawn, listed = page.eval(_DRAWN), page.eval(_LISTED)
                status = page.eval("document.getElementById('status').textContent")
                button = page.eval("document.getElementById('sample').textContent")
                shot = _screenshot(page, tmp_path / "page-sample.png")
                # drop the second sample as a browser delivers a dragged file: a drop event with files
                page.eval("""(async () => {
                    const blob = await (await fetch('sample.png?index=1')).blob();
                    const dt = new DataTransfer();
                    dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
                    document.body.dataset.state = 'dropping';
                    document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
                })()""")
                page.wait_for("document.body.dataset.state === 'done' && "
                              "document.getElementById('status').textContent.includes('dropped.png')")
                dropped_drawn, dropped_listed = page.eval(_DRAWN), page.eval(_LISTED)
                _screenshot(page, tmp_path / "page-dropped.png")
        finally:
            proc.terminate()
            proc.wait(30)
        dropped_want = httpx.post(f"{url}/detect", timeout=60, files={"images": (
            "dropped.png", httpx.get(f"{url}/sample.png", params={"index": 1}, timeout=30).content, "image/png")}
        ).json()["results"][0]
    assert "detects 4 kinds of object" in classes_text
    assert all(name in classes_text for name in ("circle", "square", "triangle", "cross"))
    assert f"{len(want['detections'])} detection(s) in sample-0.png" in status and button == "Another sample"
    _assert_page_shows(drawn, listed, want)
    _assert_page_shows(dropped_drawn, dropped_listed, dropped_want)
    # the sample is what the demo model was made for: its answer is the generator's ground truth
    image, layout = sample(0, "val", SAMPLES[0])
    assert Image.open(io.BytesIO(sample0.content)).size == (layout.width, layout.height)
    assert sorted(d["label"] for d in want["detections"]) == sorted(
        ("circle", "square", "triangle", "cross")[o.label - 1] for o in layout.objects)
    for obj in layout.objects:
        assert max(_iou(obj.box, d["box"]) for d in want["detections"] if d["label_id"] == obj.label) > 0.8
    shot_img = Image.open(io.BytesIO(shot))
    colours = np.unique(np.asarray(shot_img.convert("RGB")).reshape(-1, 3), axis=0)
    assert shot_img.size[0] == 1000 and len(colours) > 100  # a rendered page, not a blank one


def test_every_sample_is_detected_right_by_the_demo_model():
    """SAMPLES (server/sample.py) promises boxes a newcomer can trust: every one, every object."""
    from runtime import Pipeline
    from runtime.images import load_image
    from server.sample import SAMPLES, sample_png

    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"demo checkpoint missing at {DEMO_CHECKPOINT} (make demo-model)")
    from runtime.shapes import sample

    pipe = Pipeline.load(DEMO_CHECKPOINT, backend="torch")
    for i, index in enumerate(SAMPLES):
        _, layout = sample(0, "val", index)
        d = pipe.predict([load_image(sample_png(i))], pipe.options(score_threshold=0.5))[0]
        assert len(d.scores) == len(layout.objects) >= 3, index
        for obj in layout.objects:
            ious = [_iou(obj.box, b) if lab == obj.label else 0.0 for b, lab in zip(d.boxes.tolist(), d.labels.tolist())]
            assert max(ious) > 0.8, (index, obj)
        assert float(d.scores.min()) > 0.9, index
