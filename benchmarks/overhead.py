"""Server overhead per 640x480 JPEG, broken down by stage (not a test).

    python -m benchmarks.overhead [--model PATH] [--backend torch] [--requests 200] [--json FILE]

One client, one image per request, requests one after another (no batching, no queueing), against
`python -m server` started here. Per request the server reports its stages in `timing_ms`; the
client measures the whole round trip. Printed, medians over the requests:

    decode        bytes -> (h, w, 3) uint8                      (server, worker pool)
    preprocess    normalize + resize + collate                  (server)
    backend       the model itself                              (server)
    postprocess   class-wise NMS, rescale                       (server)
    http+json     round trip - everything the server timed: HTTP, multipart parsing, the hops
                  between event loop and threads, response building and JSON encoding
    overhead      round trip - backend: what serving adds to the model

Each as median and 10th percentile over the requests (per column, so the rows need not add up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.server_load import COCO, ROOT, add_server_options, served

STAGES = ("decode", "preprocess", "queue", "inference", "postprocess")


def photos_640x480(limit: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for p in sorted(COCO.glob("*.jpg")):
        with Image.open(p) as im:
            if im.size == (640, 480):
                out.append((p.name, p.read_bytes()))
        if len(out) == limit:
            break
    return out


def measure(url: str, photos: list[tuple[str, bytes]], requests: int) -> dict:
    import httpx

    rows: list[dict[str, float]] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(requests + 10):
            name, data = photos[i % len(photos)]
            t0 = time.perf_counter()
            r = c.post("/detect", files={"images": (name, data, "image/jpeg")})
            total = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            if i < 10:  # warm-up: first calls of each path allocate
                continue
            t = r.json()["timing_ms"]
            row = {k: float(t[k]) for k in STAGES}
            row["round_trip"] = total
            row["http+json"] = total - sum(row[k] for k in STAGES)
            row["overhead"] = total - row["inference"]
            rows.append(row)
    # Median and 10th percentile: on a shared machine the low percentile is the cost itself, the
    # median adds the neighbours' interference (waits for a core between threads).
    return {"p50": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
            "p10": {k: float(np.percentile([r[k] for r in rows], 10)) for k in rows[0]},
            "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "demo-tiny-shapes")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--url")
    ap.add_argument("--json", type=Path)
    add_server_options(ap)
    args = ap.parse_args(argv)

    photos = photos_640x480(16)
    with served(args, args.model) as (_, url):
        res = measure(url, photos, args.requests)
    print(f"{args.requests} sequential requests, one 640x480 JPEG each ({len(photos)} COCO128 photos), ms "
          f"(load average {res['loadavg']:.1f} on {os.cpu_count()} cores):")
    print(f"  {'':12s} {'p50':>7s} {'p10':>7s}")
    for k in ("decode", "preprocess", "queue", "inference", "postprocess", "http+json", "round_trip", "overhead"):
        print(f"  {k:12s} {res['p50'][k]:7.2f} {res['p10'][k]:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
