"""An image's answer never depends on its batch: a converted torchvision R50-FPN (stand-in weights of
tools/parity_weights.py) exported to ONNX, served by the real server on loopback with onnxruntime,
and run by `python -m runtime --batch-size 4` over a folder of mixed sizes.

Photos of two padded sizes at 600/1000 (608x800 and 800x608): padding one into the other's batch
changes detections near its border (torchvision's batching does the same), so the server and the
CLI batch only equal padded sizes. Checked: every answer under concurrency is EXACTLY (boxes, scores,
labels) the image's answer alone, and same-size images really shared backend calls (/metrics).
A control shows the test has teeth: the same two images padded into one mixed batch differ.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from srv_helpers import COCO, serve

ROOT = Path(__file__).resolve().parents[2]
# padded 608x800 (landscape) and 800x608 (portrait) at min_size 600, max_size 1000
PHOTOS = {"608x800": ("000000000009", "000000000061"), "800x608": ("000000000036", "000000000049")}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def r50_onnx(r50_parity_onnx) -> Path:
    return r50_parity_onnx


def _photo(name: str) -> tuple[str, bytes]:
    path = COCO / f"{name}.jpg"
    if not path.exists():
        pytest.skip(f"no COCO128 photo {path}")
    return f"{name}.jpg", path.read_bytes()


def _shape_counts(metrics: str) -> dict[str, tuple[float, float]]:
    """{shape: (backend calls, images)} from /metrics."""
    out: dict[str, list[float]] = {}
    for kind, i in (("batches", 0), ("images", 1)):
        for shape, v in re.findall(rf'^frcnn_shape_{kind}_total{{shape="([^"]+)"}} ([0-9.e+-]+)$', metrics, re.M):
            out.setdefault(shape, [0.0, 0.0])[i] = float(v)
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_concurrent_answers_equal_each_image_alone(r50_onnx, make_settings):
    from server.schemas import DetectResponse

    names = [n for pair in PHOTOS.values() for n in pair]
    photos = {n: _photo(n) for n in names}
    # max_batch_size 2: a pair of same-size images fills its batch; wait_when_idle and a max_delay
    # of 3 s: no image runs alone while its partner is still decoding (an image sent alone waits
    # the 3 s out, then runs alone).
    settings = make_settings(model=r50_onnx, backend="onnxruntime", score_threshold=0.05, max_detections=100,
                             max_batch_size=2, max_delay_ms=3000, wait_when_idle=True, request_timeout_s=900)

    async def concurrently(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=900) as c:
            return await asyncio.gather(*[c.post("/detect", files={"images": (photos[n][0], photos[n][1], "image/jpeg")})
                                          for n in names])

    with serve(settings) as (url, _), httpx.Client(base_url=url, timeout=900) as c:
        alone = {}
        for n in names:  # one after another: every backend call holds one image
            r = c.post("/detect", files={"images": (photos[n][0], photos[n][1], "image/jpeg")})
            assert r.status_code == 200, r.text
            alone[n] = r.json()
        before = _shape_counts(c.get("/metrics").text)
        together = asyncio.run(concurrently(url))
        after = _shape_counts(c.get("/metrics").text)

    for shape in PHOTOS:
        assert before[shape] == (2.0, 2.0), before  # alone: one image per call
        # concurrently: the two same-size photos shared one backend call
        assert (after[shape][0] - before[shape][0], after[shape][1] - before[shape][1]) == (1.0, 2.0), after
    for n, r in zip(names, together, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        DetectResponse.model_validate(body)  # the orjson body has the documented shape
        got, want = body["results"][0], alone[n]["results"][0]
        assert got["detections"], n  # the stand-in weights detect things: equality is not vacuous
        assert got == want, f"{n}: batched answer differs from the image alone"


def test_mixed_padding_would_change_answers(r50_onnx):
    """Control: padding a 608x800 photo into an 800x608 photo's batch changes its detections, so the
    equality above holds because of same-size batching, not by luck."""
    from runtime import Pipeline
    from runtime.images import load_image

    pipe = Pipeline.load(r50_onnx, backend="onnxruntime", threads=2)
    opts = pipe.options(score_threshold=0.05)
    a, b = (pipe.prepare(load_image(_photo(n)[1])) for n in (PHOTOS["608x800"][0], PHOTOS["800x608"][0]))
    assert pipe.padded_size(a) != pipe.padded_size(b)
    alone = pipe.run([a], opts)[0]
    mixed = pipe.run([a, b], opts)[0]
    same = alone.boxes.shape == mixed.boxes.shape and bool((alone.boxes == mixed.boxes).all())
    assert not (same and bool((alone.scores == mixed.scores).all()))


def test_runtime_cli_batch_of_4_over_mixed_sizes_equals_batch_of_1(r50_onnx, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for pair in PHOTOS.values():
        for n in pair:
            (folder / f"{n}.jpg").write_bytes(_photo(n)[1])
    out = {}
    for bs in (4, 1):
        dest = tmp_path / f"b{bs}.json"
        proc = subprocess.run([sys.executable, "-m", "runtime", "--model", str(r50_onnx), "--backend", "onnxruntime",
                               "--batch-size", str(bs), "--threads", "2", "--score-threshold", "0.05",
                               "--out", str(dest), str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        out[bs] = json.loads(dest.read_text())
    assert [r["image"] for r in out[4]] == sorted(f"{n}.jpg" for pair in PHOTOS.values() for n in pair)
    assert all(r["scores"] for r in out[4])
    assert out[4] == out[1]
