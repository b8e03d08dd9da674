"""Speed of model/ops on realistic Faster R-CNN sizes, side by side with torchvision's C++ ops.

    .venv/bin/python -m benchmarks.ops [--repeats 7] [--threads 2]

Cases (one 608x1024 padded image; FPN maps P2..P5 are 152x256, 76x128, 38x64, 19x32, 256 ch):
  nms_rpn_6000       6000 RPN-like, heavily overlapping proposals, IoU 0.7
  msra_1000          multi-scale RoIAlign, 1000 RoIs, 7x7, sampling_ratio 2 (Faster R-CNN box head)
  msra_train_512     the same, forward + backward wrt the maps, 512 RoIs (one training image)
  roi_align_p2_1000  roi_align alone on P2, 1000 RoIs, 7x7, sampling_ratio 2
  roi_align_p4_ad    roi_align on P4, 1000 RoIs, 7x7, adaptive sampling, aligned
  roi_pool_vgg16     roi_pool 7x7 on VGG16's conv5_3 (38x64, 512 ch, stride 16), 300 RoIs (the paper's
                     test proposals); roi_pool_vgg16_gather: the same with every RoI through the
                     gather path (model/ops/roi_pool.py), as all were before the crop path

Where .refvenv/bin/python exists, benchmarks/_tv_ops.py runs there as a subprocess on the same
inputs (a temporary safetensors file) and the table shows torchvision's time, ours / torchvision,
and whether the outputs agree. Timings are the median of `repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.ops import multiscale_roi_align, nms, roi_align, roi_pool
from model.ops.roi_pool import _forward as roi_pool_gathered

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".refvenv" / "bin" / "python"
IMAGE_HW = (608, 1024)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _proposals(g: torch.Generator, n: int, objects: int = 40) -> torch.Tensor:
    """(n, 4) RPN-like boxes: jittered around a few objects, clipped to the image."""
    h, w = IMAGE_HW
    ctr = torch.rand(objects, 2, generator=g) * torch.tensor([w, h])
    size = torch.rand(objects, 2, generator=g) * 300 + 16
    which = torch.randint(0, objects, (n,), generator=g)
    c = ctr[which] + torch.randn(n, 2, generator=g) * size[which] * 0.3
    s = size[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.3)
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    return torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))


def make_cases(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Inputs (tensors "<case>.<name>") and parameters of every case."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    t: dict[str, torch.Tensor] = {}
    p: dict[str, dict] = {}

    t["nms_rpn_6000.boxes"] = _proposals(g, 6000)
    t["nms_rpn_6000.scores"] = torch.rand(6000, generator=g)
    p["nms_rpn_6000"] = {"kind": "nms", "iou_threshold": 0.7}

    feats = [torch.randn(1, 256, int(h * s), int(w * s), generator=g) for s in SCALES]
    rois = torch.cat([torch.zeros(1000, 1), _proposals(g, 1000)], 1)
    for i, f in enumerate(feats):
        t[f"msra_1000.p{i}"] = f
    t["msra_1000.rois"] = rois
    p["msra_1000"] = {"kind": "multiscale_roi_align", "output_size": [7, 7], "spatial_scales": SCALES,
                      "sampling_ratio": 2, "image_size": list(IMAGE_HW)}

    # training: forward + backward wrt the maps, 512 sampled RoIs (the box head's batch)
    for i, f in enumerate(feats):
        t[f"msra_train_512.p{i}"] = f
    t["msra_train_512.rois"] = rois[:512]
    t["msra_train_512.grad"] = torch.randn(512, 256, 7, 7, generator=g)
    p["msra_train_512"] = {**p["msra_1000"], "kind": "multiscale_roi_align_train"}

    t["roi_align_p2_1000.input"], t["roi_align_p2_1000.rois"] = feats[0], rois
    p["roi_align_p2_1000"] = {"kind": "roi_align", "output_size": [7, 7], "spatial_scale": SCALES[0],
                              "sampling_ratio": 2, "aligned": False}
    t["roi_align_p4_ad.input"], t["roi_align_p4_ad.rois"] = feats[2], rois
    p["roi_align_p4_ad"] = {"kind": "roi_align", "output_size": [7, 7], "spatial_scale": SCALES[2],
                            "sampling_ratio": 0, "aligned": True}

    vgg = torch.randn(1, 512, h // 16, w // 16, generator=g)
    vgg_rois = torch.cat([torch.zeros(300, 1), _proposals(g, 300)], 1)
    for case in ("roi_pool_vgg16", "roi_pool_vgg16_gather"):
        t[f"{case}.input"], t[f"{case}.rois"] = vgg, vgg_rois
        p[case] = {"kind": "roi_pool", "output_size": [7, 7], "spatial_scale": 1 / 16,
                   "crops": case == "roi_pool_vgg16"}
    return t, p


def _ours(t: dict[str, torch.Tensor], case: str, p: dict):
    if p["kind"] == "nms":
        return lambda: nms(t[f"{case}.boxes"], t[f"{case}.scores"], p["iou_threshold"])
    if p["kind"] == "roi_pool":  # the op as users call it; the gather case through its kernel
        args = (t[f"{case}.input"], t[f"{case}.rois"], p["output_size"], p["spatial_scale"])
        return (lambda: roi_pool(*args)) if p["crops"] else (lambda: roi_pool_gathered(*args, crops=False)[0])
    if p["kind"] == "roi_align":
        return lambda: roi_align(t[f"{case}.input"], t[f"{case}.rois"], p["output_size"],
                                 p["spatial_scale"], p["sampling_ratio"], p["aligned"])
    feats = [t[f"{case}.p{i}"] for i in range(len(p["spatial_scales"]))]
    if p["kind"] == "multiscale_roi_align":
        return lambda: multiscale_roi_align(feats, t[f"{case}.rois"], p["output_size"], p["spatial_scales"],
                                            p["sampling_ratio"])
    leaves = [f.detach().requires_grad_(True) for f in feats]

    def train_step():  # returns the gradient of the finest map, the one compared
        out = multiscale_roi_align(leaves, t[f"{case}.rois"], p["output_size"], p["spatial_scales"],
                                   p["sampling_ratio"])
        return torch.autograd.grad(out, leaves, t[f"{case}.grad"])[0]
    return train_step


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _run_torchvision(t, p, threads: int, repeats: int) -> tuple[dict, dict] | None:
    if not REF_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "inputs.safetensors", Path(tmp) / "outputs.safetensors"
        cases = {**p, "_threads": threads, "_repeats": repeats}
        # clone: cases share tensors, and safetensors refuses shared storage
        save_file({k: v.clone() for k, v in t.items()}, str(inp), metadata={"cases": json.dumps(cases)})
        subprocess.run([str(REF_PYTHON), str(ROOT / "benchmarks" / "_tv_ops.py"), str(inp), str(out)],
                       check=True)
        with safe_open(str(out), "pt") as f:
            timings = json.loads(f.metadata()["timings_ms"])
        return timings, load_file(str(out))


def run_ops_bench(repeats: int = 7, threads: int = 2, seed: int = 0) -> list[dict]:
    """Time every case; with the reference venv present, torchvision too.

    Returns one dict per case: name, ours_ms, torchvision_ms (None without .refvenv),
    ratio (ours / torchvision), agree (outputs equal for nms and roi_pool, max abs diff for
    RoIAlign). A case "<name>_gather" also gets `vs` (its time over <name>'s, the gather path's cost
    against the op's) and `same` (outputs equal to <name>'s).
    """
    torch.set_num_threads(threads)
    t, p = make_cases(seed)
    tv = _run_torchvision(t, p, threads, repeats)
    rows, outs_by_case = [], {}
    for case, params in p.items():
        fn = _ours(t, case, params)
        with torch.inference_mode(not params["kind"].endswith("_train")):
            ms = _median_ms(fn, repeats)
            out = fn()
        row = {"name": case, "ours_ms": round(ms, 2), "torchvision_ms": None, "ratio": None, "agree": None}
        if tv is not None:
            timings, outs = tv
            ref = outs[f"{case}.out"]
            row["torchvision_ms"] = round(timings[case], 2)
            row["ratio"] = round(ms / timings[case], 3)
            row["agree"] = (bool(torch.equal(out, ref)) if params["kind"] in ("nms", "roi_pool")
                            else float((out - ref).abs().max()))
        rows.append(row)
        outs_by_case[case] = out
        base = case.removesuffix("_gather")
        if base != case:
            row["vs"] = round(ms / next(r["ours_ms"] for r in rows if r["name"] == base), 2)
            row["same"] = bool(torch.equal(out, outs_by_case[base]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="model/ops speed vs torchvision")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = run_ops_bench(args.repeats, args.threads)
    print(f"image {IMAGE_HW[0]}x{IMAGE_HW[1]}, FPN P2..P5, 256 ch, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'case':<22}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}  agree")
    for r in rows:
        tv = "-" if r["torchvision_ms"] is None else f"{r['torchvision_ms']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['name']:<22}{r['ours_ms']:>10.1f}{tv:>10}{ratio:>9}  {r['agree']}")
    for r in rows:
        if "vs" in r:
            print(f"{r['name']}: {r['vs']:.1f}x the time of {r['name'].removesuffix('_gather')}, "
                  f"outputs equal: {r['same']}")


if __name__ == "__main__":
    main()
