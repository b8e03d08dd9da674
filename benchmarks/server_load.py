"""Load benchmark of the live server beside the backend alone (not a test).

    python -m benchmarks.server_load [--model PATH | --random tiny|resnet50_fpn] [--backend torch]
        [--concurrency 1,4,16] [--duration 15] [--soak 300] [--url http://host:port]

1. Backend alone, in this process: model time per batch at batch 1..max_batch_size on COCO128
   photos, and the best batched throughput (images/s).
2. The server (`python -m server`, started here unless --url is given) driven by closed-loop
   clients at each concurrency for --duration seconds: throughput, p50/p95/p99 latency, mean batch
   size and backend time per batch (from the server's /metrics over the same window).
3. Figures against the goals: overhead at concurrency 1 (latency minus model time) as a fraction of
   model time (goal <= 10%); throughput at the highest concurrency over the best batched backend
   throughput (goal >= 0.95); with --soak, the server's RSS over a long run (goal: flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco128" / "train2017"
CACHE = Path(tempfile.gettempdir()) / "frcnn-bench-cache"  # ONNX exports made for benchmarking


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# -- backend alone ------------------------------------------------------------------------------

def backend_alone(model: Path, backend: str, images: list[np.ndarray], max_batch: int, threads: int,
                  seconds_per_size: float) -> dict:
    import torch

    from runtime import Pipeline

    torch.set_num_threads(threads)
    pipe = Pipeline.load(model, backend=backend, threads=threads)
    prepared = [pipe.prepare(im) for im in images]
    out: dict = {"backend": pipe.backend_name, "per_batch_s": {}, "throughput": {}}
    sizes = sorted({1, *[b for b in (2, 4, 8, 16) if b < max_batch], max_batch})
    for b in sizes:
        batches = [pipe.collate([prepared[(i * b + j) % len(prepared)] for j in range(b)])
                   for i in range(max(1, len(prepared) // b))]
        pipe.infer(batches[0])  # warm-up
        times, t_end = [], time.perf_counter() + seconds_per_size
        i = 0
        while time.perf_counter() < t_end or len(times) < 3:
            t0 = time.perf_counter()
            pipe.infer(batches[i % len(batches)])
            times.append(time.perf_counter() - t0)
            i += 1
        # The fastest run: on a shared machine the median mostly measures the neighbours. Taking the
        # backend at its best makes both goals (overhead, throughput ratio) harder, not easier.
        best, med = min(times), statistics.median(times)
        out["per_batch_s"][b] = best
        out.setdefault("per_batch_median_s", {})[b] = med
        out["throughput"][b] = b / best
        print(f"  backend alone  batch {b:2d}: {best * 1000:8.1f} ms/batch best, {med * 1000:8.1f} median  "
              f"{b / best:7.2f} img/s  ({len(times)} runs)")
    # The whole offline path at batch 1 (decode excluded): prepare + infer + postprocess.
    t = []
    for im in images[:10]:
        t0 = time.perf_counter()
        pipe.predict([im], pipe.options(score_threshold=0.5))
        t.append(time.perf_counter() - t0)
    out["pipeline_batch1_s"] = statistics.median(t)
    out["best_throughput"] = max(out["throughput"].values())
    return out


# -- live server --------------------------------------------------------------------------------

def start_server(args: argparse.Namespace, model: Path) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "FRCNN_INTRA_OP_THREADS": str(args.threads), "FRCNN_QUEUE_SIZE": "256",
           "FRCNN_CACHE_DIR": str(CACHE), "FRCNN_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--backend", args.backend, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
           "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("frcnn_batch_size_sum", "frcnn_batch_size_count", "frcnn_backend_seconds_sum",
                 "frcnn_backend_seconds_count", "frcnn_inference_seconds_sum"):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, payloads: list[tuple[str, bytes]], concurrency: int, seconds: float,
                on_tick=None) -> dict:
    import httpx

    latencies: list[float] = []
    overheads: list[float] = []  # per request: latency minus the backend time the server reports for it
    backend: list[float] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                name, data = payloads[i % len(payloads)]
                i += concurrency
                t0 = time.perf_counter()
                r = await client.post("/detect", files={"images": (name, data, "image/jpeg")})
                latencies.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    inference = r.json()["timing_ms"]["inference"] / 1e3
                    backend.append(inference)
                    overheads.append(latencies[-1] - inference)

        async def ticker() -> None:
            while time.perf_counter() < stop:
                await asyncio.sleep(5)
                on_tick()

        t0 = time.perf_counter()
        tasks = [worker(k) for k in range(concurrency)] + ([ticker()] if on_tick else [])
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    return {"requests": sum(codes.values()), "codes": codes, "wall_s": wall, "throughput": ok / wall,
            "p50_ms": pct(latencies, 50) * 1e3, "p95_ms": pct(latencies, 95) * 1e3, "p99_ms": pct(latencies, 99) * 1e3,
            "overhead_p50_ms": pct(overheads, 50) * 1e3, "backend_p50_ms": pct(backend, 50) * 1e3,
            "overhead_frac_p50": pct([o / b for o, b in zip(overheads, backend, strict=True) if b > 0], 50)}


def load_level(url: str, payloads, concurrency: int, seconds: float) -> dict:
    before = scrape(url)
    res = asyncio.run(drive(url, payloads, concurrency, seconds))
    after = scrape(url)
    batches = after["frcnn_batch_size_count"] - before["frcnn_batch_size_count"]
    images = after["frcnn_batch_size_sum"] - before["frcnn_batch_size_sum"]
    backend_s = after["frcnn_backend_seconds_sum"] - before["frcnn_backend_seconds_sum"]
    res["mean_batch"] = images / batches if batches else float("nan")
    res["server_backend_ms_per_batch"] = backend_s / batches * 1e3 if batches else float("nan")
    res["server_backend_share"] = backend_s / res["wall_s"]  # fraction of wall time the backend ran
    return res


# -- main ---------------------------------------------------------------------------------------

def make_random_checkpoint(preset_name: str, out: Path) -> Path:
    import torch

    import model

    torch.manual_seed(0)
    cfg = model.preset(preset_name, num_classes=91)
    model.save_checkpoint(out, model.build_model(cfg).eval(), cfg, provenance={"source": "benchmark, random"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "demo-tiny-shapes")
    ap.add_argument("--random", choices=["tiny", "resnet50_fpn", "mobilenet_v3_large_fpn"],
                    help="benchmark a randomly initialised model of this preset instead (speed only)")
    ap.add_argument("--backend", default="torch", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--url", help="drive this running server instead of starting one")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of a memory soak at the top concurrency")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="backend intra-op threads")
    ap.add_argument("--images", type=int, default=32, help="COCO128 photos to cycle through")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)

    from runtime.images import load_image

    paths = sorted(COCO.glob("*.jpg"))[: args.images]
    if not paths:
        ap.error(f"no photos under {COCO}")
    payloads = [(p.name, p.read_bytes()) for p in paths]
    model = args.model
    tmp = None
    if args.random:
        tmp = tempfile.TemporaryDirectory()
        model = make_random_checkpoint(args.random, Path(tmp.name) / f"random-{args.random}")
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"model": str(model), "random": args.random, "backend": args.backend, "cpus": os.cpu_count(),
                    "threads": args.threads, "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms}

    # The same file and backend the server will pick (backend "auto" on a checkpoint exports ONNX).
    from server.model_source import resolve
    from server.settings import Settings

    alone_model, alone_backend = resolve(Settings(_env_file=None, model=model, backend=args.backend))
    print(f"backend alone ({alone_model.name}, {alone_backend}, {args.threads} threads):")
    alone = backend_alone(alone_model, alone_backend, [load_image(d) for _, d in payloads], args.max_batch_size,
                          args.threads, seconds_per_size=max(3.0, args.duration / 3))
    report["backend_alone"] = alone

    proc = None
    if args.url:
        url = args.url
    else:
        proc, url = start_server(args, model)
    try:
        print(f"server at {url}:")
        print(f"  {'conc':>4} {'req':>6} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} "
              f"{'backend ms/batch':>16} {'overhead p50 ms':>15}")
        report["levels"] = {}
        for c in levels:
            r = load_level(url, payloads, c, args.duration)
            report["levels"][c] = r
            print(f"  {c:4d} {r['requests']:6d} {r['throughput']:7.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
                  f"{r['p99_ms']:8.1f} {r['mean_batch']:6.2f} {r['server_backend_ms_per_batch']:16.1f} "
                  f"{r['overhead_p50_ms']:15.1f}  {r['codes']}")
        if args.soak and proc is not None:
            samples: list[tuple[float, float]] = []
            t0 = time.perf_counter()
            samples.append((0.0, rss_mb(proc.pid)))
            r = asyncio.run(drive(url, payloads, levels[-1], args.soak,
                                  on_tick=lambda: samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))))
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            half = [m for t, m in samples if t >= args.soak / 2]
            report["soak"] = {"seconds": args.soak, "requests": r["requests"], "codes": r["codes"],
                              "rss_mb": samples, "rss_first_mb": samples[0][1], "rss_max_mb": max(m for _, m in samples),
                              "rss_second_half_growth_mb": (half[-1] - half[0]) if len(half) > 1 else 0.0}
            print(f"  soak {args.soak:.0f}s at concurrency {levels[-1]}: RSS {samples[0][1]:.0f} MB at start, "
                  f"{samples[1][1] if len(samples) > 1 else float('nan'):.0f} MB after 5 s, "
                  f"max {report['soak']['rss_max_mb']:.0f} MB, growth over the second half "
                  f"{report['soak']['rss_second_half_growth_mb']:+.1f} MB")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        if tmp is not None:
            tmp.cleanup()

    model_1 = alone["per_batch_s"][1] * 1e3
    c1 = report["levels"].get(1)
    summary = {}
    if c1:
        summary["overhead_ms_vs_backend_alone"] = c1["p50_ms"] - model_1
        summary["overhead_frac_vs_backend_alone"] = (c1["p50_ms"] - model_1) / model_1
        # Per request, against the backend time of that very request: immune to the neighbours.
        summary["overhead_ms_per_request_p50"] = c1["overhead_p50_ms"]
        summary["overhead_frac_per_request_p50"] = c1["overhead_frac_p50"]
    top = report["levels"][levels[-1]]
    summary["throughput_ratio_top_vs_best_batched"] = top["throughput"] / alone["best_throughput"]
    report["summary"] = summary
    print("summary:")
    print(f"  model time at batch 1 (backend alone): {model_1:.1f} ms; best batched backend throughput "
          f"{alone['best_throughput']:.2f} img/s")
    if c1:
        print(f"  overhead at concurrency 1, per request (latency - that request's backend time): median "
              f"{c1['overhead_p50_ms']:.1f} ms = {100 * c1['overhead_frac_p50']:.1f}% of its model time "
              f"(median backend {c1['backend_p50_ms']:.1f} ms; goal <= 10%)")
        print(f"    p50 latency - backend alone at batch 1: {summary['overhead_ms_vs_backend_alone']:.1f} ms = "
              f"{100 * summary['overhead_frac_vs_backend_alone']:.1f}% (only meaningful on a quiet machine)")
    # Contemporaneous view, robust to a noisy machine: what the same backend, at the batch sizes the
    # server formed, would do if it never waited for the server (busy 100% of the wall time).
    if top["server_backend_ms_per_batch"] == top["server_backend_ms_per_batch"]:  # not NaN
        ideal = top["mean_batch"] / (top["server_backend_ms_per_batch"] / 1e3)
        summary["throughput_ratio_top_vs_server_backend"] = top["throughput"] / ideal
    print(f"  throughput at concurrency {levels[-1]}: {top['throughput']:.2f} img/s = "
          f"{summary['throughput_ratio_top_vs_best_batched']:.2f}x the best batched backend alone (goal >= 0.95x)")
    if "throughput_ratio_top_vs_server_backend" in summary:
        print(f"    = {summary['throughput_ratio_top_vs_server_backend']:.2f}x the server's own backend at its mean "
              f"batch of {top['mean_batch']:.1f} (the backend was busy {100 * top['server_backend_share']:.0f}% "
              f"of the time)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
