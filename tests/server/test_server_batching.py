"""Batching under concurrency (seen in /metrics), backpressure, timeouts, API key, CORS, draining on shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from srv_helpers import jpeg_bytes, serve

REPO = Path(__file__).resolve().parents[2]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def _burst(url: str, n: int, data: bytes, **kw) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*[c.post("/detect", files={"images": (f"{i}.jpg", data, "image/jpeg")}, **kw)
                                      for i in range(n)])


def test_concurrent_requests_are_batched(make_settings):
    # wait_when_idle and a max_delay (10 s) beyond the test: a batch leaves only when full, so 12
    # same-size images make exactly three batches of four whatever the machine's speed.
    with serve(make_settings(max_batch_size=4, max_delay_ms=10_000, wait_when_idle=True)) as (url, _):
        responses = asyncio.run(_burst(url, 12, jpeg_bytes()))
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["results"][0]["image"] for r in responses) == sorted(f"{i}.jpg" for i in range(12))
    assert _metric(metrics, "frcnn_batch_size_count") == 3  # the warm-up does not count
    assert _metric(metrics, "frcnn_batch_size_sum") == 12
    assert _metric(metrics, 'frcnn_batch_size_bucket{le="3.0"}') == 0  # every batch full
    shape = re.findall(r'^frcnn_shape_images_total\{shape="(\d+x\d+)"\} 12.0$', metrics, re.M)
    assert len(shape) == 1, "one padded shape, all twelve images"
    assert _metric(metrics, f'frcnn_shape_batches_total{{shape="{shape[0]}"}}') == 3
    assert _metric(metrics, 'frcnn_requests_total{method="POST",route="/detect",status="200"}') == 12


def test_two_sizes_run_in_separate_batches(make_settings):
    """Landscape and portrait images pad to different sizes: never one batch, each size batched."""
    wide, tall = jpeg_bytes((640, 480)), jpeg_bytes((480, 640))

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/detect", files={"images": (f"{i}.jpg", wide if i % 2 else tall,
                                                                              "image/jpeg")}) for i in range(8)])

    with serve(make_settings(max_batch_size=4, max_delay_ms=10_000, wait_when_idle=True)) as (url, _):
        responses = asyncio.run(burst(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 8
    shapes = dict(re.findall(r'^frcnn_shape_batches_total\{shape="(\d+x\d+)"\} ([0-9.]+)$', metrics, re.M))
    images = dict(re.findall(r'^frcnn_shape_images_total\{shape="(\d+x\d+)"\} ([0-9.]+)$', metrics, re.M))
    assert len(shapes) == 2 and set(shapes.values()) == {"1.0"} and set(images.values()) == {"4.0"}, metrics
    h, w = map(int, next(iter(shapes)).split("x"))
    assert f"{w}x{h}" in shapes  # the two orientations of one size


def test_request_that_does_not_fit_the_queue_is_503_with_retry_after(make_settings):
    files = [("images", (f"{i}.jpg", jpeg_bytes(), "image/jpeg")) for i in range(3)]
    with serve(make_settings(queue_size=2, max_images_per_request=4)) as (url, _), httpx.Client(base_url=url,
                                                                                                 timeout=60) as c:
        refused = c.post("/detect", files=files)  # three images, room for two: refused whole
        fits = c.post("/detect", files=files[:2])
        metrics = c.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "overloaded"
    assert fits.status_code == 200 and len(fits.json()["results"]) == 2
    assert _metric(metrics, "frcnn_rejected_total") == 3


def test_request_timeout_is_504_and_server_recovers(make_settings):
    with serve(make_settings(request_timeout_s=0.001)) as (url, _):
        r = httpx.post(f"{url}/detect", files={"images": ("x.jpg", jpeg_bytes(), "image/jpeg")}, timeout=60)
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert httpx.get(f"{url}/ready").status_code == 200


def test_api_key_and_cors(make_settings):
    settings = make_settings(api_key="s3cret", cors_origins=["http://viewer.example"])
    files = {"images": ("x.jpg", jpeg_bytes((64, 48)), "image/jpeg")}
    with serve(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/detect", files=files).status_code == 401
        assert c.post("/detect", files=files, headers={"X-API-Key": "wrong"}).json()["error"] == "unauthorized"
        odd = c.post("/detect", files=files, headers={"X-API-Key": "s3cr\xe9t".encode("latin-1")})
        assert odd.status_code == 401
        assert c.get("/model").status_code == 401
        assert c.post("/detect", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # probes stay open
        pre = c.options("/detect", headers={"Origin": "http://viewer.example", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "x-api-key"})
        assert pre.headers["access-control-allow-origin"] == "http://viewer.example"
        other = c.options("/detect", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_sigterm_drains_accepted_requests(tiny_checkpoint, tmp_path):
    """`python -m server` in its own process: requests queued when SIGTERM arrives are all answered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "FRCNN_BACKEND": "torch", "FRCNN_SCORE_THRESHOLD": "0.0", "FRCNN_QUEUE_SIZE": "32",
           "FRCNN_INTRA_OP_THREADS": "1", "FRCNN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_checkpoint), "--port", str(port),
                             "--max-batch-size", "1", "--max-delay-ms", "0", "--workers", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                data = jpeg_bytes((640, 480))
                tasks = [asyncio.create_task(c.post("/detect", files={"images": (f"{i}.jpg", data, "image/jpeg")}))
                         for i in range(8)]
                deadline = time.monotonic() + 120
                while True:  # SIGTERM only once several requests wait in the queue (a condition)
                    depth = _metric((await c.get("/metrics")).text, "frcnn_queue_depth")
                    if depth >= 3:
                        break
                    assert time.monotonic() < deadline and not any(t.done() for t in tasks), "never queued"
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(scenario())
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in responses] == [200] * 8, out
    # uvicorn re-raises the captured SIGTERM once shutdown is complete, so -15 is a clean exit here
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "queue drained" in out
