"""The web page in headless Chromium (Debian's `chromium` package), driven over the DevTools protocol:
choose an image in the file input, and the boxes the server returned are drawn with labels and scores."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from srv_helpers import CLASS_NAMES, serve
from websockets.sync.client import connect

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
        proc, ws_url = _launch(url + "/", tmp_path / "profile")
        try:
            with connect(ws_url, max_size=None, open_timeout=30) as ws:
                page = DevTools(ws)
                page.call("Runtime.enable")
                page.wait_for("document.readyState === 'complete' && document.getElementById('threshold').value !== ''")
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
    assert view_box == f"0 0 {want['width']} {want['height']}"
    assert shown == f"{want['width']}x{want['height']}"  # the image shown is the one the boxes refer to
    assert len(drawn) == len(want["detections"]) and f"{len(drawn)} detection(s) in {photo.name}" in status
    for d, w in zip(drawn, want["detections"], strict=True):
        x1, y1, x2, y2 = w["box"]
        assert d["box"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        label, score = d["text"].rsplit(" ", 1)
        assert label == w["label"] and label in CLASS_NAMES and float(score) == pytest.approx(w["score"], abs=0.006)
