"""torchvision side of benchmarks/ops.py. Runs inside the reference venv (.refvenv), never imports
the project:

    .refvenv/bin/python benchmarks/_tv_ops.py INPUTS.safetensors OUT.safetensors

Reads the cases written by benchmarks/ops.py (tensors "<case>.<name>", parameters as JSON in the
metadata), times torchvision on the same inputs and writes its outputs plus the timings
(metadata "timings_ms", JSON) so that ops.py can print both side by side and check agreement.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import ops


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _case_fn(t: dict[str, torch.Tensor], case: str, p: dict):
    """The torchvision call of one case, as a no-argument function (None for unknown kinds)."""
    if p["kind"] == "nms":
        def fn():
            return ops.nms(t[f"{case}.boxes"], t[f"{case}.scores"], p["iou_threshold"])
    elif p["kind"] == "roi_align":
        def fn():
            return ops.roi_align(t[f"{case}.input"], t[f"{case}.rois"], p["output_size"],
                                 p["spatial_scale"], p["sampling_ratio"], p["aligned"])
    elif p["kind"] == "roi_pool":
        def fn():
            return ops.roi_pool(t[f"{case}.input"], t[f"{case}.rois"], p["output_size"], p["spatial_scale"])
    elif p["kind"] == "multiscale_roi_align":
        names = [f"p{i}" for i in range(len(p["spatial_scales"]))]
        feats = {n: t[f"{case}.{n}"] for n in names}
        rois = t[f"{case}.rois"]
        boxes = [rois[rois[:, 0] == i, 1:] for i in range(feats[names[0]].shape[0])]
        pooler = ops.MultiScaleRoIAlign(names, p["output_size"], p["sampling_ratio"])
        shapes = [tuple(p["image_size"])] * len(boxes)

        def fn():
            return pooler(feats, boxes, shapes)
    elif p["kind"] == "multiscale_roi_align_train":
        names = [f"p{i}" for i in range(len(p["spatial_scales"]))]
        leaves = {n: t[f"{case}.{n}"].detach().requires_grad_(True) for n in names}
        boxes = [t[f"{case}.rois"][:, 1:]]  # one image
        pooler = ops.MultiScaleRoIAlign(names, p["output_size"], p["sampling_ratio"])
        shapes = [tuple(p["image_size"])]

        def fn():  # the gradient of the finest map, the one compared
            out = pooler(leaves, boxes, shapes)
            return torch.autograd.grad(out, list(leaves.values()), t[f"{case}.grad"])[0]
    else:
        return None
    return fn


def main(inputs: str, out_path: str) -> None:
    t = load_file(inputs)
    with safe_open(inputs, "pt") as f:
        meta = json.loads(f.metadata()["cases"])
    torch.set_num_threads(int(meta.pop("_threads")))
    repeats = int(meta.pop("_repeats"))
    outs, timings = {}, {}
    for case, p in meta.items():
        fn = _case_fn(t, case, p)
        if fn is None:
            continue
        timings[case] = _median_ms(fn, repeats)
        outs[f"{case}.out"] = fn().contiguous()
    save_file(outs, out_path, metadata={"timings_ms": json.dumps(timings)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
