"""Write tests/fixtures/ops_golden.safetensors: seeded inputs and torchvision's outputs for the ops
in model/ops, so the tests can check parity without torchvision installed.

Run with the reference venv (torchvision, CUDA build on CPU), never the project venv:

    .refvenv/bin/python tools/make_golden_ops.py [--out PATH]

Keys are "<case>.<tensor>"; scalar parameters of each case are in the file's metadata as JSON
under the case name. Keep the file small (< 1 MB): tiny feature maps, a few hundred boxes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file
from torchvision import ops

ROOT = Path(__file__).resolve().parents[1]


def random_boxes(g: torch.Generator, n: int, width: float, height: float, max_side: float) -> torch.Tensor:
    """(n, 4) xyxy boxes with continuous coordinates, some sticking out of the image."""
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    side = torch.rand(n, 2, generator=g) * max_side + 0.5
    return torch.cat([ctr - side / 2, ctr + side / 2], 1)


def clustered_boxes(g: torch.Generator, n: int, width: float, height: float, clusters: int) -> torch.Tensor:
    """(n, 4) RPN-like boxes: jittered copies around a few objects, heavily overlapping."""
    ctr = torch.rand(clusters, 2, generator=g) * torch.tensor([width, height])
    size = torch.rand(clusters, 2, generator=g) * width / 5 + 8
    which = torch.randint(0, clusters, (n,), generator=g)
    c = ctr[which] + torch.randn(n, 2, generator=g) * size[which] * 0.3
    s = size[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.3)
    return torch.cat([c - s / 2, c + s / 2], 1)


def distinct_scores(g: torch.Generator, n: int) -> torch.Tensor:
    """A random permutation of distinct values: no ties, so the keep order is unambiguous."""
    return (torch.randperm(n, generator=g).float() + 1) / (n + 1)


def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(20261121)
    t: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}

    # --- nms ---
    for case, boxes, thr in [
        ("nms_random", random_boxes(g, 500, 200, 150, 60), 0.5),
        ("nms_rpn", clustered_boxes(g, 1200, 320, 240, 12), 0.7),
    ]:
        scores = distinct_scores(g, boxes.shape[0])
        t[f"{case}.boxes"], t[f"{case}.scores"] = boxes, scores
        t[f"{case}.keep"] = ops.nms(boxes, scores, thr)
        meta[case] = {"iou_threshold": thr}

    boxes = clustered_boxes(g, 600, 320, 240, 10)
    scores = distinct_scores(g, 600)
    idxs = torch.randint(0, 5, (600,), generator=g)
    t["batched_nms.boxes"], t["batched_nms.scores"], t["batched_nms.idxs"] = boxes, scores, idxs
    t["batched_nms.keep"] = ops.batched_nms(boxes, scores, idxs, 0.5)
    meta["batched_nms"] = {"iou_threshold": 0.5}

    # --- box_iou ---
    b1, b2 = random_boxes(g, 30, 100, 80, 40), random_boxes(g, 40, 100, 80, 40)
    t["box_iou.boxes1"], t["box_iou.boxes2"], t["box_iou.iou"] = b1, b2, ops.box_iou(b1, b2)

    # --- roi_align / roi_pool on one small map; non-square output catches h/w swaps ---
    feat = torch.randn(2, 3, 12, 15, generator=g)
    rois = torch.cat([torch.randint(0, 2, (24, 1), generator=g).float(),
                      random_boxes(g, 24, 30, 24, 20)], 1)
    rois[:4, 3:] = rois[:4, 1:3] + 0.3  # tiny RoIs: the "at least 1x1" rule when not aligned
    t["roi.input"], t["roi.rois"] = feat, rois
    meta["roi"] = {"output_size": [5, 4], "spatial_scale": 0.5}
    for aligned in (False, True):
        for sr in (0, 2):
            t[f"roi.align_{int(aligned)}_{sr}"] = ops.roi_align(feat, rois, (5, 4), 0.5, sr, aligned)
    t["roi.pool"] = ops.roi_pool(feat, rois, (5, 4), 0.5)

    # --- roi_align gradient wrt the features ---
    gfeat = torch.randn(1, 2, 8, 9, generator=g)
    grois = torch.cat([torch.zeros(6, 1), random_boxes(g, 6, 18, 16, 12)], 1)
    gout = torch.randn(6, 2, 3, 3, generator=g)
    t["grad.input"], t["grad.rois"], t["grad.grad_output"] = gfeat, grois, gout
    meta["grad"] = {"output_size": [3, 3], "spatial_scale": 0.5}
    for aligned, sr in ((False, 2), (True, 0)):
        x = gfeat.clone().requires_grad_(True)
        ops.roi_align(x, grois, (3, 3), 0.5, sr, aligned).backward(gout)
        t[f"grad.input_grad_{int(aligned)}_{sr}"] = x.grad

    # --- MultiScaleRoIAlign on 4 levels (P2..P5 of a 128x192 image); canonical_scale 28 so that
    # boxes of this small image spread over all levels ---
    img_h, img_w = 128, 192
    names = ["p2", "p3", "p4", "p5"]
    feats = {n: torch.randn(2, 3, img_h >> lvl, img_w >> lvl, generator=g) for n, lvl in zip(names, range(2, 6), strict=True)}
    per_image = [random_boxes(g, 20, img_w, img_h, 100).clamp(min=0) for _ in range(2)]
    msra = ops.MultiScaleRoIAlign(names, (4, 3), 2, canonical_scale=28, canonical_level=4)
    t["msra.rois"] = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i)), b], 1)
                                for i, b in enumerate(per_image)])
    for n in names:
        t[f"msra.{n}"] = feats[n]
    t["msra.output"] = msra(feats, per_image, [(img_h, img_w)] * 2)
    meta["msra"] = {"output_size": [4, 3], "spatial_scales": [0.25, 0.125, 0.0625, 0.03125],
                    "sampling_ratio": 2, "canonical_scale": 28, "canonical_level": 4}

    info = {k: json.dumps(v) for k, v in meta.items()}
    info["torchvision"] = torchvision.__version__
    info["torch"] = torch.__version__
    return {k: v.contiguous() for k, v in t.items()}, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "ops_golden.safetensors")
    args = ap.parse_args()
    tensors, info = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=info)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
