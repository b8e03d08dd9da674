"""Precision on CPU, side by side in one run: torchvision eager vs our fp32 and int8 ONNX (R50-FPN),
and what precision costs in box AP (fp32 vs fp16 vs int8) on a detector with real ground truth.

    python -m benchmarks.onnx_speed [--checkpoint CKPT] [--images DIR] [--n 6] [--threads 2]
                                    [--repeats 3] [--cold]
                                    [--ap-checkpoint checkpoints/demo-tiny-shapes] [--out results.json]

Speed: the same weights (a checkpoint; default: tools/parity_weights.py's deterministic R50
stand-in, since no pretrained weights can be downloaded here) at 600/1000 on the same COCO128 photos,
one image per call, end to end (preprocess, network, postprocess: what torchvision's net([img])
does). Variants:
  torchvision   fasterrcnn_resnet50_fpn eager, in the reference venv (.refvenv, `make refvenv`)
  ort-fp32      the exported graph (export.onnx_export.build_graph) through runtime.Pipeline, as
                the server runs it on a CPU: large 3x3 convolutions by Winograd F(4x4, 3x3)
                (runtime/backends/winograd.py)
  ort-fp32-direct  the same graph with every convolution direct, as the file says (--no-winograd)
  ort-int8      the same graph through export.precision (what `export onnx --precision int8` runs),
                calibrated on 16 other COCO128 photos
They run interleaved image by image, each keeping its best of --repeats per image, so load from
other processes hits them alike; a variant's repeats run back to back (warm, as a server runs its
model), or with --cold alternating with the other variants on every run. Beside them: the direct
fp32 run's achieved GFLOP/s (the model's FLOPs per image, counted by torch's FlopCounterMode at each
image's padded size), the Winograd run's direct-equivalent GFLOP/s (the same FLOPs over its time: it
does fewer multiplies, so this can pass the peak), and this machine's fp32 GEMM peak (a torch matmul
timed in the same run).

AP (--ap-checkpoint): a checkpoint trained on SyntheticShapes, its val split (real ground truth),
torch fp32 vs ONNX fp32 / fp16 / int8 (int8 calibrated on its train split), the same postprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco128" / "train2017"
REFVENV_PY = ROOT / ".refvenv" / "bin" / "python"


def parity_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import save_parity_checkpoint

    return save_parity_checkpoint(out)


class TorchvisionServer:
    """torchvision eager in the reference venv, one image per request (benchmarks/_tv_model.py)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], threads: int, work: Path):
        weights = work / "tv_weights.pth"
        torch.save(dict(state_dict), weights)
        cmd = [str(REFVENV_PY), str(ROOT / "benchmarks" / "_tv_model.py"), "--weights", str(weights),
               "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(self.proc.stdout.readline())  # {"ready": ...}

    def __call__(self, path: Path) -> float:
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved_times(variants: dict, paths: list[Path], repeats: int, *, warm: bool = True
                      ) -> dict[str, list[float]]:
    """variants: name -> fn(path) -> seconds; the best of `repeats` per image and variant. Image by
    image, every variant in turn, so load changes on a shared machine hit all variants alike.

    warm (default): a variant's repeats run back to back, as a server runs its one model: the best
    is a run whose weights and buffers the previous run left in cache. Not warm: variants alternate
    on every run, so each run starts after another model evicted the caches (int8 R50-FPN about 7%
    slower that way, torchvision eager less: measured)."""
    for fn in variants.values():
        fn(paths[0])  # warm-up
    best = {name: [float("inf")] * len(paths) for name in variants}
    for i, p in enumerate(paths):
        if warm:
            for name, fn in variants.items():
                best[name][i] = min(fn(p) for _ in range(repeats))
            continue
        for _ in range(repeats):
            for name, fn in variants.items():
                best[name][i] = min(best[name][i], fn(p))
    return best


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM peak of this machine (torch matmul, best of `repeats`), GFLOP/s."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_gflop(net, pipe, images: list[np.ndarray]) -> list[float]:
    """FLOPs (GFLOP) of one forward per image at its own padded size, by torch's FlopCounterMode
    (convolutions and matmuls: nearly all of R50-FPN's work)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = []
    for img in images:
        batch = pipe.collate([pipe.prepare(img)])
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(batch.images, batch.image_sizes)
        out.append(fc.get_total_flops() / 1e9)
    return out


def ap_per_precision(ckpt: Path, work: Path, threads: int, n_val: int = 128) -> dict:
    """Box AP / AP50 on SyntheticShapes val of a checkpoint trained on it, per precision."""
    from export.onnx_export import build_graph
    from export.precision import calibration_feeds, to_precision
    from model.checkpoint import load_checkpoint
    from runtime.coco import coco_metrics, detections_to_coco
    from runtime.pipeline import Pipeline
    from train.shapes import SyntheticShapes

    net, meta = load_checkpoint(ckpt)
    ref = Pipeline.from_model(net, meta.config, meta.class_names, name=ckpt.name)
    fp32 = build_graph(net, meta.config, meta.class_names, model_name=ckpt.name)
    train = SyntheticShapes(split="train", size=32)
    feeds = calibration_feeds(ref, [train[i][0].permute(1, 2, 0).numpy() for i in range(len(train))])
    pipes = {"torch-fp32": ref}
    for precision in ("fp32", "fp16", "int8"):
        path = work / f"shapes.{precision}.onnx"
        onnx.save_model(to_precision(fp32, precision, feeds=feeds if precision == "int8" else None), str(path))
        pipes[f"ort-{precision}"] = Pipeline.load(path, threads=threads)
    val = SyntheticShapes(split="val", size=n_val)
    out = {}
    for name, pipe in pipes.items():
        opts, results = pipe.options(score_threshold=0.05), []
        for s in range(0, len(val), 4):
            items = [val[i] for i in range(s, min(s + 4, len(val)))]
            dets = pipe.predict([im for im, _ in items], options=opts)
            results += detections_to_coco(dets, [t["image_id"] for _, t in items], val.label_to_category_id)
        m = coco_metrics(val.coco_gt(), results)
        out[name] = {"AP": round(100 * m["AP"], 2), "AP50": round(100 * m["AP50"], 2)}
    for name in ("ort-fp16", "ort-int8"):
        out[name]["AP_cost_vs_fp32"] = round(out["ort-fp32"]["AP"] - out[name]["AP"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint dir (default: R50 parity stand-in weights)")
    ap.add_argument("--images", default=str(COCO))
    ap.add_argument("--n", type=int, default=6, help="images timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="alternate the variants on every run (each starts with caches another model filled)")
    ap.add_argument("--ap-checkpoint", default=str(ROOT / "checkpoints" / "demo-tiny-shapes"),
                    help="a checkpoint trained on synthetic shapes: box AP per precision ('' skips)")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from export.onnx_export import build_graph
    from export.precision import calibration_feeds, to_precision
    from model.checkpoint import load_checkpoint
    from runtime.images import list_images, load_image
    from runtime.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="onnx_speed_"))
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    ckpt = Path(args.checkpoint) if args.checkpoint else parity_checkpoint(work / "r50-parity")
    net, meta = load_checkpoint(ckpt)
    ref = Pipeline.from_model(net, meta.config, meta.class_names, name=ckpt.name)
    paths = list_images(args.images)
    test_paths, calib_paths = paths[: args.n], paths[args.n: args.n + 16]
    images = {p: load_image(p) for p in test_paths}

    fp32 = build_graph(net, meta.config, meta.class_names, model_name=ckpt.name)
    onnx.save_model(fp32, str(work / "model.onnx"))
    int8 = to_precision(fp32, "int8", feeds=calibration_feeds(ref, [load_image(p) for p in calib_paths]))
    onnx.save_model(int8, str(work / "model.int8.onnx"))
    pipes = {"ort-fp32": Pipeline.load(work / "model.onnx", threads=args.threads),
             "ort-fp32-direct": Pipeline.load(work / "model.onnx", threads=args.threads, winograd=False),
             "ort-int8": Pipeline.load(work / "model.int8.onnx", threads=args.threads)}
    results["winograd_convs"] = {name: p.backend.winograd_convs for name, p in pipes.items()}

    dets: dict[str, dict] = {name: {} for name in pipes}

    def timed(name, pipe):
        def run(path):
            t = time.perf_counter()
            dets[name][path] = pipe.predict([images[path]])[0]
            return time.perf_counter() - t
        return run

    variants = {}
    tv = TorchvisionServer(net.state_dict(), args.threads, work) if REFVENV_PY.exists() else None
    if tv is not None:
        variants["torchvision"] = tv
    else:
        results["note"] = "no .refvenv (make refvenv): torchvision not timed"
    variants |= {name: timed(name, p) for name, p in pipes.items()}
    results["images"] = [p.name for p in test_paths]
    results["timing"] = "cold (variants alternate every run)" if args.cold else "warm (each variant's repeats back to back)"
    results["s_per_image"] = interleaved_times(variants, test_paths, args.repeats, warm=not args.cold)
    if tv is not None:
        tv.close()
    mean = {k: sum(v) / len(v) for k, v in results["s_per_image"].items()}
    results["mean_s_per_image"] = mean
    if "torchvision" in mean:
        results["ratio_to_torchvision"] = {k: round(v / mean["torchvision"], 3) for k, v in mean.items()}
    # int8 against fp32 (the fp32 graph gives the checkpoint's detections) at each precision's gate rule
    from export.verify import GATES, MatchRule, match_rate

    rh = meta.config.roi_heads

    def rates(x: str, y: str) -> dict:
        a, b = [dets[x][p] for p in test_paths], [dets[y][p] for p in test_paths]
        return {f"iou>={g.iou},score+-{g.score_tol} ({name} rule)": round(match_rate(a, b, MatchRule(
            iou=g.iou, score_tol=g.score_tol, nms_iou=rh.nms_thresh, score_threshold=rh.score_thresh,
            max_detections=rh.detections_per_img)), 3) for name, g in GATES.items()}

    results["int8_vs_fp32_match_rate"] = rates("ort-fp32-direct", "ort-int8")
    results["fp32_winograd_vs_direct_match_rate"] = rates("ort-fp32-direct", "ort-fp32")
    gflop = model_gflop(net, ref, [images[p] for p in test_paths])
    results["fp32_gflop_per_image"] = [round(g, 1) for g in gflop]
    results["fp32_achieved_gflops"] = round(sum(gflop) / sum(results["s_per_image"]["ort-fp32-direct"]), 1)
    results["fp32_winograd_direct_equivalent_gflops"] = round(sum(gflop) / sum(results["s_per_image"]["ort-fp32"]), 1)
    results["int8_effective_gflops"] = round(sum(gflop) / sum(results["s_per_image"]["ort-int8"]), 1)
    results["fp32_matmul_peak_gflops"] = round(matmul_peak_gflops(args.threads), 1)
    if args.ap_checkpoint:
        results["ap_synthetic_shapes"] = ap_per_precision(Path(args.ap_checkpoint), work, args.threads)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
