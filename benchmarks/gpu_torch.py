"""The torch backend on CUDA: R50-FPN at 600/1000, latency at batch 1 and throughput at batch 8 of
same-size images, fp32 and autocast (bf16, fp16), detections checked against the CPU (not a test).

    python -m benchmarks.gpu_torch [--checkpoint DIR] [--runs 30] [--json FILE]

Weights: --checkpoint, an R50-FPN checkpoint directory (torchvision's COCO weights converted:
`python -m model fetch coco-r50 --out DIR`, which also takes a local file with --url file://...);
without it, tools/parity_weights.py's stand-in weights (seeded, their detections mean nothing).
Only the backend call is timed (inputs prepared and padded before; its outputs are copied back to
the host, which synchronizes). "fp32" is fp32 on the GPU too: TF32 is switched off for it (cuDNN
convolutions use TF32 by default, a 10-bit mantissa). Detections: each confident CPU detection
(score >= 0.3) must have a CUDA twin with the same label, IoU >= 0.9 and a score within 0.02 (fp32)
or 0.05 (bf16/fp16) for >= 90% of them. With the stand-in weights that holds for fp32 only: a
random network is chaotic under reduced precision (on the CPU, bf16 autocast matched 0-1% of its
confident fp32 detections, decoding in fp32 or not), so there the autocast modes' agreement is
reported and not gated; with a real checkpoint every mode is gated.

Needs only torch (>= 2.6), numpy, Pillow, safetensors and this repository: no server packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco128" / "train2017"


def r50_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import save_parity_checkpoint

    return save_parity_checkpoint(out)


def same_size_photos(pipe, n: int) -> list:
    """n prepared photos of the most common padded size (the batches the server forms)."""
    from runtime.images import load_image

    by_size: dict = {}
    for p in sorted(COCO.glob("*.jpg")):
        item = pipe.prepare(load_image(p))
        by_size.setdefault(pipe.padded_size(item), []).append(item)
    items = max(by_size.values(), key=len)
    return (items * (n // len(items) + 1))[:n]


def infer(pipe, batch, dtype: torch.dtype | None):
    """One backend call, under autocast when dtype is given; raw outputs back in float32."""
    from model.postprocess import RawDetections

    if dtype is None:
        raw = pipe.infer(batch)
    else:
        with torch.autocast("cuda", dtype=dtype):
            raw = pipe.infer(batch)
    return RawDetections(*(t.float() if t.is_floating_point() else t for t in raw))


def timed(pipe, batch, dtype, runs: int) -> float:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        infer(pipe, batch, dtype)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        infer(pipe, batch, dtype)  # outputs copied to the host: synchronizes
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def matched_fraction(cpu, gpu, score_tol: float) -> float:
    keep = cpu.scores >= 0.3
    if not keep.any():
        return 1.0
    if len(gpu.scores) == 0:
        return 0.0
    ok = ((iou(cpu.boxes[keep], gpu.boxes) >= 0.9) & (cpu.labels[keep][:, None] == gpu.labels[None, :])
          & ((cpu.scores[keep][:, None] - gpu.scores[None, :]).abs() <= score_tol)).any(dim=1)
    return float(ok.float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_torch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="R50-FPN checkpoint dir (default: stand-in weights)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    from runtime import Pipeline

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or r50_checkpoint(Path(tmp.name) / "r50-parity")
    cpu = Pipeline.load(ckpt, backend="torch", device="cpu")
    gpu = Pipeline.load(ckpt, backend="torch", device="cuda")
    items = same_size_photos(cpu, 8)
    one, eight = cpu.collate(items[:1]), cpu.collate(items)
    opts = cpu.options(score_threshold=0.05)
    want = cpu.postprocess(cpu.infer(one), one, opts)[0]
    stand_in = args.checkpoint is None
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "weights": "stand-in" if stand_in else str(args.checkpoint),
              "padded_size": list(eight.images.shape[-2:]), "runs": args.runs, "modes": {}}
    print(f"{report['device']}, torch {torch.__version__}, R50-FPN 600/1000, padded {report['padded_size']}, "
          f"{report['weights']} weights")
    modes = [("fp32", None, 0.02)]
    if torch.cuda.is_bf16_supported():
        modes.append(("bf16 autocast", torch.bfloat16, 0.05))
    modes.append(("fp16 autocast", torch.float16, 0.05))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # torch's defaults
    for name, dtype, tol in modes:
        # fp32 means fp32: no TF32 in cuDNN convolutions or matmuls; the autocast modes keep the defaults
        allow = (False, False) if dtype is None else tf32
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
        gated = dtype is None or not stand_in
        lat = timed(gpu, one, dtype, args.runs)
        thr = 8 / timed(gpu, eight, dtype, args.runs)
        got = gpu.postprocess(infer(gpu, one, dtype), one, opts)[0]
        frac = matched_fraction(want, got, tol)
        report["modes"][name] = {"latency_batch1_ms": lat * 1e3, "throughput_batch8_img_s": thr,
                                 "cpu_detections_matched": frac, "score_tol": tol, "gated": gated}
        verdict = ("ok" if frac >= 0.9 else "FAIL") if gated else "not gated: stand-in weights"
        print(f"  {name:14s} batch 1: {lat * 1e3:7.2f} ms   batch 8: {thr:7.1f} img/s   "
              f"CPU detections matched {100 * frac:5.1f}% ({verdict}, score tol {tol})")
    tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(m["cpu_detections_matched"] >= 0.9 for m in report["modes"].values() if m["gated"]) else 1


if __name__ == "__main__":
    sys.exit(main())
