"""`make bench`: the detector's speed on this machine, side by side with torchvision in one run.

    .venv/bin/python -m benchmarks.core [--images 4] [--repeats 2] [--threads 2] [--skip-ops]

1. Ops (benchmarks/ops.py): NMS of 6000 boxes, multi-scale RoIAlign of 1000 RoIs x 256 channels.
2. The full R50-FPN at min/max size 600/1000, one COCO128 image per call, seconds per image, with
   the same stand-in weights (tools/parity_weights.py) in our model and, where the reference venv
   exists (`make refvenv`), in torchvision's eager model (benchmarks/_tv_model.py, a subprocess).
Each image's time is the best of `repeats` calls after a warm-up, ours and torchvision's calls
interleaved; the table gives their mean.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.onnx_speed import TorchvisionServer
from benchmarks.ops import REF_PYTHON, run_ops_bench
from model.checkpoint import save_checkpoint
from model.torchvision_import import load_torchvision, torchvision_config
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco128" / "train2017"


def _images(n: int) -> list[Path]:
    paths = sorted(COCO.glob("*.jpg"))[:n]
    if not paths:
        sys.exit(f"no COCO128 images under {COCO}")
    return paths


def time_side_by_side(weights: dict[str, torch.Tensor], paths: list[Path], repeats: int, threads: int,
                      tmp: Path) -> tuple[list[float], list[float] | None]:
    """Per image, best of `repeats` calls of ours (the serving path: checkpoint -> runtime.Pipeline,
    torch backend) and of torchvision eager, interleaved so machine load hits both alike."""
    cfg = torchvision_config("resnet50_fpn", 91, 600, 1000)
    save_checkpoint(tmp / "r50", load_torchvision(weights, cfg), cfg)
    pipe = Pipeline.load(tmp / "r50", backend="torch", threads=threads)
    tv = None
    if REF_PYTHON.exists():
        tv = TorchvisionServer(weights, threads, tmp)
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pipe.predict([imgs[0]])  # warm-up
    if tv is not None:
        tv(paths[0])
    ours_t, tv_t = [], []
    for path, img in zip(paths, imgs):
        best, best_tv = float("inf"), float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            pipe.predict([img])
            best = min(best, time.perf_counter() - t)
            if tv is not None:
                best_tv = min(best_tv, tv(path))
        ours_t.append(best)
        tv_t.append(best_tv)
    if tv is not None:
        tv.close()
    return ours_t, (tv_t if tv is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ops", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not REF_PYTHON.exists():
        print("(no .refvenv: torchvision columns empty; `make refvenv` adds them)")
    if not args.skip_ops:
        rows = run_ops_bench(repeats=7, threads=args.threads)
        print(f"\nops ({args.threads} threads, median ms)")
        print(f"{'case':<20}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}")
        for r in rows:
            tv = "-" if r["torchvision_ms"] is None else f"{r['torchvision_ms']:.1f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(f"{r['name']:<20}{r['ours_ms']:>10.1f}{tv:>10}{ratio:>9}")

    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import parity_state_dict

    weights = parity_state_dict()
    paths = _images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        ours, tv = time_side_by_side(weights, paths, args.repeats, args.threads, Path(tmp))
    mean_ours = sum(ours) / len(ours)
    print(f"\nfasterrcnn_resnet50_fpn, 600/1000, batch 1, {len(paths)} COCO128 images, {args.threads} threads")
    print(f"{'':<14}{'s/img':>8}")
    print(f"{'ours':<14}{mean_ours:>8.3f}")
    if tv is not None:
        mean_tv = sum(tv) / len(tv)
        print(f"{'torchvision':<14}{mean_tv:>8.3f}")
        print(f"ours / torchvision = {mean_ours / mean_tv:.3f}")


if __name__ == "__main__":
    main()
