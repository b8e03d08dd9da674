"""A cheap-to-send, costly-to-decode request beside a stream of small ones (not a test).

    python -m benchmarks.hostile_decode [--model PATH] [--backend torch] [--images 16] [--side 6300]
        [--json FILE] [--url http://host:port]

One client posts `--images` flat PNGs of side x side pixels (about 12 KB each, each under
max_pixels) in one request, while another client keeps posting one small COCO photo at a time.
Printed: the costly request's status and time, the small requests' p50/p99/max latency while the
costly one was in flight, and the server's resident memory (RSS at start, peak RSS = VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.server_load import COCO, ROOT, add_server_options, pct, served

CACHE = Path(tempfile.gettempdir()) / "frcnn-bench-cache"


def flat_png(side: int, seed: int) -> bytes:
    """A side x side 1-bit PNG, a few dots on white: 40 megapixels that deflate to about 12 KB."""
    path = CACHE / f"flat-{side}-{seed}.png"
    if path.is_file():
        return path.read_bytes()
    from PIL import Image

    img = Image.new("1", (side, side), 1)
    for k in range(8):  # distinct files, so that no cache could answer them
        img.putpixel(((seed * 97 + k * 631) % side, (seed * 53 + k * 389) % side), 0)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def proc_status(pid: int, key: str) -> float:
    """VmRSS / VmHWM of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scenario(url: str, costly: list[bytes], small: bytes, settle_s: float) -> dict:
    import httpx

    small_lat: list[tuple[float, float, int]] = []  # (start, latency, status)
    window: dict[str, float] = {}
    done = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, timeout=600) as a, httpx.AsyncClient(base_url=url, timeout=600) as b:
        async def small_stream() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                r = await b.post("/detect", files={"images": ("small.jpg", small, "image/jpeg")})
                small_lat.append((t0, time.perf_counter() - t0, r.status_code))

        async def costly_request() -> tuple[int, float, str]:
            await asyncio.sleep(settle_s)  # a few small requests first: the idle latency
            files = [("images", (f"big{i}.png", data, "image/png")) for i, data in enumerate(costly)]
            window["start"] = time.perf_counter()
            r = await a.post("/detect", files=files)
            window["end"] = time.perf_counter()
            await asyncio.sleep(settle_s)
            done.set()
            return r.status_code, window["end"] - window["start"], r.text[:200]

        stream = asyncio.create_task(small_stream())
        status, seconds, text = await costly_request()
        await stream
    before = [lat for t, lat, _ in small_lat if t + lat < window["start"]]
    during = [(lat, code) for t, lat, code in small_lat if t < window["end"] and t + lat > window["start"]]
    lat = [x for x, _ in during]
    return {"costly_status": status, "costly_s": seconds, "costly_body": text if status != 200 else "",
            "small_idle_p50_ms": pct(before, 50) * 1e3, "small_during_n": len(during),
            "small_during_codes": sorted({c for _, c in during}),
            "small_during_p50_ms": pct(lat, 50) * 1e3, "small_during_p99_ms": pct(lat, 99) * 1e3,
            "small_during_max_ms": max(lat) * 1e3 if lat else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hostile_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "demo-tiny-shapes")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=6300)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of small requests before and after")
    ap.add_argument("--url", help="drive this running server (no RSS figures) instead of starting one")
    ap.add_argument("--json", type=Path)
    add_server_options(ap)
    args = ap.parse_args(argv)

    costly = [flat_png(args.side, i) for i in range(args.images)]
    small = sorted(COCO.glob("*.jpg"))[0].read_bytes()
    print(f"costly request: {args.images} PNGs of {args.side}x{args.side} px, "
          f"{sum(map(len, costly)) / 1024:.0f} KB in all; small request: one {len(small) / 1024:.0f} KB JPEG")
    with served(args, args.model) as (proc, url):
        rss0 = proc_status(proc.pid, "VmRSS") if proc else float("nan")
        res = asyncio.run(scenario(url, costly, small, args.settle))
        if proc:
            res["rss_start_mb"], res["rss_peak_mb"] = rss0, proc_status(proc.pid, "VmHWM")
    print(f"costly request: HTTP {res['costly_status']} after {res['costly_s']:.2f} s {res['costly_body']}")
    print(f"small requests: idle p50 {res['small_idle_p50_ms']:.0f} ms; while the costly one ran "
          f"({res['small_during_n']} requests, HTTP {res['small_during_codes']}): "
          f"p50 {res['small_during_p50_ms']:.0f} ms, p99 {res['small_during_p99_ms']:.0f} ms, "
          f"max {res['small_during_max_ms']:.0f} ms")
    if proc:
        print(f"server RSS: {res['rss_start_mb']:.0f} MB at start, peak {res['rss_peak_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
