"""`make serve MODEL=coco-mnv3`, the whole path a user with a network runs: download (sha256-checked)
-> convert -> `python -m export onnx --if-stale` -> `python -m server`. No network here: the
download is a file:// URL of stand-in weights in torchvision's format (tools/parity_weights.py),
with their own checksum; the wrong-checksum case is tests/model/test_published.py."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from srv_helpers import COCO

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"make serve exited with {proc.returncode} before the server was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("server not ready in time")
        time.sleep(0.5)  # polling a readiness probe, as an orchestrator does


def test_make_serve_a_published_model_end_to_end(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import parity_state_dict

    photo = sorted(COCO.glob("*.jpg"))[:1]
    if not photo:
        pytest.skip(f"no COCO128 photos under {COCO}")
    weights = tmp_path / "standin.pth"
    torch.save(parity_state_dict("mobilenet_v3_large_fpn"), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    port, cache = _free_port(), tmp_path / "serve"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    # -o .venv/.installed: the venv is what this test runs in; do not reinstall it
    proc = subprocess.Popen(["make", "-o", ".venv/.installed", "serve", "MODEL=coco-mnv3", f"PORT={port}",
                             f"SERVE_CACHE={cache}", f"WEIGHTS_URL={weights.as_uri()}", f"WEIGHTS_SHA256={sha}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s=900)
        info = httpx.get(f"{url}/model", timeout=30).json()
        detect = httpx.post(f"{url}/detect", files={"images": (photo[0].name, photo[0].read_bytes(), "image/jpeg")},
                            data={"score_threshold": "0.3"}, timeout=120).json()["results"][0]
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert info["name"] == "coco-mnv3" and info["backend"] == "onnxruntime", log
    assert info["precision"] == "fp32" and info["input"]["min_size"] == 600 and info["input"]["max_size"] == 1000
    assert len(info["classes"]) == 91 and info["classes"][1] == "person" and info["sample"] is None
    # what was cached: the checked weights, the converted checkpoint, the exported graph
    assert (tmp_path / "xdg" / "frcnn" / "weights" / "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth").is_file()
    assert (cache / "coco-mnv3" / "model.safetensors").is_file() and (cache / "coco-mnv3.onnx").is_file()
    # the served answer is the converted checkpoint's own (torch, eager) answer
    from runtime import Pipeline
    from runtime.images import load_image

    pipe = Pipeline.load(cache / "coco-mnv3", backend="torch")
    want = pipe.predict([load_image(photo[0])], pipe.options(score_threshold=0.3))[0]
    assert len(detect["detections"]) == len(want.scores) > 0, log
    np.testing.assert_allclose([d["box"] for d in detect["detections"]], want.boxes.numpy(), atol=0.5)
    assert [d["label_id"] for d in detect["detections"]] == want.labels.tolist()
    # a second start converts and exports nothing: fetch is a no-op, export --if-stale skips
    stamps = [(cache / "coco-mnv3" / "model.safetensors").stat().st_mtime_ns, (cache / "coco-mnv3.onnx").stat().st_mtime_ns]
    py = str(ROOT / ".venv" / "bin" / "python")
    for cmd in (["-m", "model", "fetch", "coco-mnv3", "--out", str(cache / "coco-mnv3"), "--url", weights.as_uri(),
                 "--sha256", sha],
                ["-m", "export", "onnx", "--checkpoint", str(cache / "coco-mnv3"), "--out", str(cache / "coco-mnv3.onnx"),
                 "--if-stale"]):
        done = subprocess.run([py, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert [(cache / "coco-mnv3" / "model.safetensors").stat().st_mtime_ns,
            (cache / "coco-mnv3.onnx").stat().st_mtime_ns] == stamps
