"""Load benchmark of the live server beside the backend alone (not a test).

    python -m benchmarks.server_load [--model PATH | --random tiny|resnet50_fpn | --r50-parity]
        [--backend onnxruntime] [--concurrency 1,4,16] [--streams same,mixed] [--duration 15]
        [--mixed-batches] [--soak 300] [--url http://host:port]

`make bench-server` runs the converted torchvision R50-FPN (stand-in weights of
tools/parity_weights.py, exported to ONNX once and cached) on onnxruntime.

1. Backend alone, in this process: model time per batch at batch 1..max_batch_size over COCO128
   photos of ONE padded size (the only batches the server forms), and the best batched
   throughput (images/s).
2. The server (`python -m server`, started here unless --url is given) driven by closed-loop
   clients at each concurrency for --duration seconds, per stream: "same" (photos of one padded
   size) and "mixed" (three padded sizes interleaved): throughput, p50/p95/p99 latency, mean
   batch size and backend time per batch (from the server's /metrics over the same window).
   --mixed-batches serves with FRCNN_BATCH_MIXED_SIZES=1 (padded mixed batches; answers change).
3. Figures against the goals: batch-4 over batch-1 backend throughput (goal >= 1); overhead at
   concurrency 1 (latency minus model time); throughput at the highest concurrency over the best
   batched backend throughput (goal >= 0.95); with --soak, the server's RSS over a long run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Callable
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
    # Only equal padded sizes batch (as in the server): the most common size's photos.
    by_size: dict = {}
    for p in prepared:
        by_size.setdefault(pipe.padded_size(p), []).append(p)
    size, prepared = max(by_size.items(), key=lambda kv: len(kv[1]))
    out: dict = {"backend": pipe.backend_name, "per_batch_s": {}, "throughput": {}, "padded_size": list(size)}
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
    for im in images[:3]:
        t0 = time.perf_counter()
        pipe.predict([im], pipe.options(score_threshold=0.5))
        t.append(time.perf_counter() - t0)
    out["pipeline_batch1_s"] = statistics.median(t)
    out["best_throughput"] = max(out["throughput"].values())
    return out


# -- live server --------------------------------------------------------------------------------

def add_server_options(ap: argparse.ArgumentParser) -> None:
    """start_server's knobs (the server's defaults otherwise), for every benchmark that starts one."""
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)


@contextlib.contextmanager
def served(args: argparse.Namespace, model: Path, cwd: Path = ROOT):
    """Yields (process or None, url): args.url when given, else a `python -m server` started here
    (from the code in `cwd`: another checkout serves its own version)."""
    if args.url:
        yield None, args.url
        return
    proc, url = start_server(args, model, cwd)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Until ready() is true (it may raise OSError while the process starts); RuntimeError when
    the process exits first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.2)


def start_server(args: argparse.Namespace, model: Path, cwd: Path = ROOT) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # A long request timeout: at concurrency 16 a slow model's requests wait for 16 images ahead.
    env = {**os.environ, "FRCNN_THREADS": str(args.threads), "FRCNN_QUEUE_SIZE": "256",
           "FRCNN_REQUEST_TIMEOUT_S": "900",
           "FRCNN_BATCH_MIXED_SIZES": "1" if getattr(args, "mixed_batches", False) else "0",
           "FRCNN_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--backend", args.backend, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
           "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_ready(proc, ready, "server", 900)
    return proc, url


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


def r50_parity_onnx() -> Path:
    """The converted torchvision R50-FPN with tools/parity_weights.py's stand-in weights, exported to
    ONNX once (about 3 minutes) and cached while the checkpoint and the export code are unchanged:
    real detections, so postprocess costs what it would."""
    from export.onnx_export import export_onnx, is_fresh

    out, ckpt = CACHE / "r50-parity-600-1000.onnx", CACHE / "r50-parity-ckpt"
    if ckpt.is_dir() and is_fresh(out, ckpt):
        return out
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import save_parity_checkpoint

    save_parity_checkpoint(ckpt)
    print(f"exporting the R50-FPN stand-in to {out} (once) ...")
    return export_onnx(ckpt, out, verify=False)


def streams(paths: list[Path], model: Path, backend: str, threads: int, n: int) -> dict[str, list[tuple[str, bytes]]]:
    """"same": n photos of the most common padded size; "mixed": n photos of the three most common
    padded sizes, interleaved (consecutive requests differ in size)."""
    from runtime import Pipeline
    from runtime.images import load_image
    from server.model_source import resolve
    from server.settings import Settings

    path, kind = resolve(Settings(_env_file=None, model=model, backend=backend))
    pipe = Pipeline.load(path, backend=kind, threads=threads)
    by_size: dict[tuple[int, int], list[Path]] = {}
    for p in paths:
        by_size.setdefault(tuple(pipe.padded_size(pipe.prepare(load_image(p)))), []).append(p)
    ranked = sorted(by_size.values(), key=len, reverse=True)
    same = ranked[0][:n]
    k = max(1, n // 3)
    mixed = [p for trio in zip(*(g[:k] for g in ranked[:3])) for p in trio]
    return {"same": [(p.name, p.read_bytes()) for p in same], "mixed": [(p.name, p.read_bytes()) for p in mixed]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "demo-tiny-shapes")
    ap.add_argument("--random", choices=["tiny", "resnet50_fpn", "mobilenet_v3_large_fpn"],
                    help="benchmark a randomly initialised model of this preset instead (speed only)")
    ap.add_argument("--r50-parity", action="store_true",
                    help="the converted torchvision R50-FPN stand-in, as ONNX (what `make bench-server` runs)")
    ap.add_argument("--backend", default="torch", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--url", help="drive this running server instead of starting one")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--streams", default="same,mixed", help="comma-separated: same, mixed")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of a memory soak at the top concurrency")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--mixed-batches", action="store_true", help="serve with padded mixed-size batches")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="backend intra-op threads")
    ap.add_argument("--images", type=int, default=24, help="photos per stream")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)

    from runtime.images import load_image

    paths = sorted(COCO.glob("*.jpg"))
    if not paths:
        ap.error(f"no photos under {COCO}")
    model = args.model
    tmp = None
    if args.r50_parity:
        model, args.backend = r50_parity_onnx(), "onnxruntime"
    elif args.random:
        tmp = tempfile.TemporaryDirectory()
        model = make_random_checkpoint(args.random, Path(tmp.name) / f"random-{args.random}")
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = [w for w in args.streams.split(",") if w]
    payloads_by_stream = streams(paths, model, args.backend, args.threads, args.images)
    report: dict = {"model": str(model), "random": args.random, "backend": args.backend, "cpus": os.cpu_count(),
                    "threads": args.threads, "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms,
                    "mixed_batches": args.mixed_batches, "loadavg_start": os.getloadavg()}

    from server.model_source import resolve
    from server.settings import Settings

    alone_model, alone_backend = resolve(Settings(_env_file=None, model=model, backend=args.backend))
    print(f"backend alone ({alone_model.name}, {alone_backend}, {args.threads} threads):")
    alone = backend_alone(alone_model, alone_backend, [load_image(d) for _, d in payloads_by_stream["same"]],
                          args.max_batch_size, args.threads, seconds_per_size=max(3.0, args.duration / 3))
    report["backend_alone"] = alone

    proc = None
    if args.url:
        url = args.url
    else:
        proc, url = start_server(args, model)
    try:
        import httpx

        chosen = httpx.get(f"{url}/model", timeout=30).json()["max_batch_size"]
        report["server_max_batch_size"] = chosen
        print(f"server at {url} ({'padded mixed-size batches' if args.mixed_batches else 'same-size batches'}; "
              f"batches of at most {chosen} of max_batch_size {args.max_batch_size}, batch_autotune):")
        print(f"  {'stream':>6} {'conc':>4} {'req':>6} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'batch':>6} {'backend ms/batch':>16} {'overhead p50 ms':>15}")
        report["levels"] = {}
        for stream in wanted:
            for c in levels:
                r = load_level(url, payloads_by_stream[stream], c, args.duration)
                report["levels"][f"{stream}/{c}"] = r
                print(f"  {stream:>6} {c:4d} {r['requests']:6d} {r['throughput']:7.2f} {r['p50_ms']:8.1f} "
                      f"{r['p95_ms']:8.1f} {r['p99_ms']:8.1f} {r['mean_batch']:6.2f} "
                      f"{r['server_backend_ms_per_batch']:16.1f} {r['overhead_p50_ms']:15.1f}  {r['codes']}")
        if args.soak and proc is not None:
            samples: list[tuple[float, float]] = []
            t0 = time.perf_counter()
            samples.append((0.0, rss_mb(proc.pid)))
            r = asyncio.run(drive(url, payloads_by_stream[wanted[0]], levels[-1], args.soak,
                                  on_tick=lambda: samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))))
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            half = [m for t, m in samples if t >= args.soak / 2]
            report["soak"] = {"seconds": args.soak, "requests": r["requests"], "codes": r["codes"],
                              "rss_mb": samples, "rss_first_mb": samples[0][1], "rss_max_mb": max(m for _, m in samples),
                              "rss_second_half_growth_mb": (half[-1] - half[0]) if len(half) > 1 else 0.0}
            print(f"  soak {args.soak:.0f}s at concurrency {levels[-1]}: RSS {samples[0][1]:.0f} MB at start, "
                  f"max {report['soak']['rss_max_mb']:.0f} MB, growth over the second half "
                  f"{report['soak']['rss_second_half_growth_mb']:+.1f} MB")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        if tmp is not None:
            tmp.cleanup()
    report["loadavg_end"] = os.getloadavg()

    model_1 = alone["per_batch_s"][1] * 1e3
    summary: dict = {}
    tp = alone["throughput"]
    if 4 in tp:
        summary["backend_batch4_over_batch1"] = tp[4] / tp[1]
    print("summary (the machine is shared: load average "
          f"{report['loadavg_start'][0]:.1f} at start, {report['loadavg_end'][0]:.1f} at the end):")
    print(f"  backend alone, same-size batches: batch 1 {tp[1]:.2f} img/s"
          + (f", batch 4 {tp[4]:.2f} img/s = {summary['backend_batch4_over_batch1']:.2f}x (goal >= 1)" if 4 in tp else "")
          + f"; best {alone['best_throughput']:.2f} img/s")
    for stream in wanted:
        c1 = report["levels"].get(f"{stream}/1")
        top = report["levels"][f"{stream}/{levels[-1]}"]
        if c1:
            summary[f"{stream}_overhead_ms_per_request_p50"] = c1["overhead_p50_ms"]
            print(f"  {stream}: overhead at concurrency 1 (latency - that request's backend time) median "
                  f"{c1['overhead_p50_ms']:.1f} ms = {100 * c1['overhead_frac_p50']:.1f}% of its model time")
        summary[f"{stream}_throughput_ratio_top_vs_best_batched"] = top["throughput"] / alone["best_throughput"]
        line = (f"  {stream}: throughput at concurrency {levels[-1]} {top['throughput']:.2f} img/s = "
                f"{summary[f'{stream}_throughput_ratio_top_vs_best_batched']:.2f}x the best batched backend alone "
                f"(goal >= 0.95x)")
        if top["server_backend_ms_per_batch"] == top["server_backend_ms_per_batch"]:  # not NaN
            # Contemporaneous, robust to a noisy machine: the server's own backend at its batches.
            ideal = top["mean_batch"] / (top["server_backend_ms_per_batch"] / 1e3)
            summary[f"{stream}_throughput_ratio_top_vs_server_backend"] = top["throughput"] / ideal
            line += (f"; {summary[f'{stream}_throughput_ratio_top_vs_server_backend']:.2f}x its own backend at "
                     f"mean batch {top['mean_batch']:.1f} (busy {100 * top['server_backend_share']:.0f}% of the time)")
        print(line)
    print(f"  model time at batch 1 (backend alone): {model_1:.1f} ms")
    report["summary"] = summary
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
