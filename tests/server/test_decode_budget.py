"""Costly-to-decode uploads against the real server on loopback: refused from their headers, decoded
in their own lane while small requests go on, and their unstarted work cancelled once answered.

The costly image: a 6300 x 6300 one-bit PNG (under max_pixels, about 12 KB; 119 MB once decoded to
RGB, and seconds of one core through normalize + resize).
"""

from __future__ import annotations

import asyncio
import io
import re
import time

import httpx
import pytest
from srv_helpers import jpeg_bytes, serve

SIDE = 6300


@pytest.fixture(scope="module")
def big_pngs() -> list[bytes]:
    from PIL import Image

    out = []
    for k in range(4):
        img = Image.new("1", (SIDE, SIDE), 1)
        img.putpixel((100 * k + 7, 200), 0)  # distinct files
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        out.append(buf.getvalue())
    return out


def _files(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"big{i}.png", data, "image/png")) for i, data in enumerate(pngs)]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _final_metrics(server) -> str:
    """/metrics as rendered after the server stopped: every accepted item drained by then."""
    return server.config.app.state.metrics.render().decode()


def test_request_over_the_pixel_budget_is_413_before_any_decode(make_settings, big_pngs):
    settings = make_settings(max_pixels=SIDE * SIDE, max_request_pixels=3 * SIDE * SIDE)
    with serve(settings) as (url, server):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/detect", files=_files(big_pngs), timeout=60)
        elapsed = time.perf_counter() - t0
        ok = httpx.post(f"{url}/detect", files=_files(big_pngs[:1]), timeout=120)
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels", r.text
    assert str(4 * SIDE * SIDE) in r.json()["detail"] and str(3 * SIDE * SIDE) in r.json()["detail"]
    assert elapsed < 1.0  # headers only: decoding four of them takes seconds
    assert ok.status_code == 200  # one of them alone is within the budget
    metrics = _final_metrics(server)
    assert _metric(metrics, "frcnn_refused_pixels_total") == 1
    assert _metric(metrics, "frcnn_preprocess_seconds_count") == 1  # only the accepted image was decoded


def test_small_request_is_answered_within_1s_while_large_images_decode(make_settings, big_pngs):
    settings = make_settings(max_pixels=SIDE * SIDE, request_timeout_s=120)

    async def scenario(url: str) -> tuple[httpx.Response, float, bool, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            costly = asyncio.create_task(c.post("/detect", files=_files(big_pngs)))
            deadline = time.monotonic() + 60
            # Condition, not a sleep: the server says it is decoding a large image.
            while _metric((await c.get("/metrics")).text, 'frcnn_decoding{lane="large"}') < 1:
                assert time.monotonic() < deadline, "the large decode never started"
                assert not costly.done(), costly.result().text
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            small = await c.post("/detect", files={"images": ("small.jpg", jpeg_bytes((640, 480)), "image/jpeg")})
            small_s = time.perf_counter() - t0
            overlapped = not costly.done()
            return small, small_s, overlapped, await costly

    with serve(settings) as (url, _):
        small, small_s, overlapped, costly = asyncio.run(scenario(url))
    assert small.status_code == 200, small.text
    assert overlapped, "the costly request ended before the small one: nothing was shown"
    assert small_s < 1.0, f"small request took {small_s:.2f}s beside the large decodes"
    assert costly.status_code == 200, costly.text
    assert [r["width"] for r in costly.json()["results"]] == [SIDE] * 4


def test_504_cancels_the_request_s_unstarted_work(make_settings, big_pngs):
    # One large lane: the four decodes run one after another, each longer than the timeout here
    # (0.4-0.7 s with its resize on this machine; a faster one may finish the first within it).
    settings = make_settings(max_pixels=SIDE * SIDE, request_timeout_s=0.2)
    with serve(settings) as (url, server):
        r = httpx.post(f"{url}/detect", files=_files(big_pngs), timeout=120)
    assert r.status_code == 504 and r.json()["error"] == "timeout", r.text
    metrics = _final_metrics(server)
    decoded = _metric(metrics, "frcnn_preprocess_seconds_count")
    skipped_decode = _metric(metrics, 'frcnn_cancelled_total{stage="decode"}')
    skipped_backend = _metric(metrics, 'frcnn_cancelled_total{stage="inference"}')
    inferred = _metric(metrics, "frcnn_batch_size_sum")  # images that reached the backend
    assert decoded + skipped_decode == 4  # each image either decoded or dropped unstarted
    assert skipped_decode >= 2  # at most two decodes could start within 0.2 s
    # A decode that ended before the 504 may have gone on to the backend (an idle server runs a
    # lone image at once); one that ended after it never does.
    assert inferred + skipped_backend == decoded
    assert inferred <= 1


def test_client_gone_cancels_the_request_s_unstarted_work(make_settings, big_pngs):
    settings = make_settings(max_pixels=SIDE * SIDE, request_timeout_s=120)

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as watch:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                costly = asyncio.create_task(c.post("/detect", files=_files(big_pngs)))
                deadline = time.monotonic() + 60
                while _metric((await watch.get("/metrics")).text, 'frcnn_decoding{lane="large"}') < 1:
                    assert time.monotonic() < deadline, "the large decode never started"
                    await asyncio.sleep(0.01)
                costly.cancel()  # the client goes away: its connection is closed
                with pytest.raises(asyncio.CancelledError):
                    await costly
            # The server notices the disconnect and drops the queued decodes.
            while _metric((await watch.get("/metrics")).text, 'frcnn_cancelled_total{stage="decode"}') < 1:
                assert time.monotonic() < deadline, "nothing was cancelled after the client left"

    with serve(settings) as (url, server):
        asyncio.run(scenario(url))
    metrics = _final_metrics(server)
    decoded = _metric(metrics, "frcnn_preprocess_seconds_count")
    assert decoded + _metric(metrics, 'frcnn_cancelled_total{stage="decode"}') == 4
    # The decode running when the client left ends after it and is dropped before the backend.
    assert _metric(metrics, "frcnn_batch_size_sum") + _metric(metrics, 'frcnn_cancelled_total{stage="inference"}') == decoded
    assert _metric(metrics, "frcnn_batch_size_sum") == 0


def test_a_lone_image_s_client_gone_mid_decode_never_reaches_the_backend(make_settings, big_pngs):
    """One image whose client leaves while it decodes: the disconnect watcher ends the wait and
    run_jobs cancels the request's work, so the decode in flight ends and is dropped before the
    backend."""
    settings = make_settings(max_pixels=SIDE * SIDE, request_timeout_s=120)

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as watch:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                costly = asyncio.create_task(c.post("/detect", files=_files(big_pngs[:1])))
                deadline = time.monotonic() + 60
                while _metric((await watch.get("/metrics")).text, 'frcnn_decoding{lane="large"}') < 1:
                    assert time.monotonic() < deadline, "the large decode never started"
                    await asyncio.sleep(0.01)
                costly.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await costly
            while _metric((await watch.get("/metrics")).text, 'frcnn_cancelled_total{stage="inference"}') < 1:
                assert time.monotonic() < deadline, "the decoded image was not dropped after the client left"
                await asyncio.sleep(0.01)
            r = await watch.post("/detect", files={"images": ("x.jpg", jpeg_bytes((64, 48)), "image/jpeg")})
            assert r.status_code == 200  # and the server goes on

    with serve(settings) as (url, server):
        asyncio.run(scenario(url))
    metrics = _final_metrics(server)
    assert _metric(metrics, "frcnn_batch_size_sum") == 1  # the small image only
