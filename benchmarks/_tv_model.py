"""Helper for benchmarks/onnx_speed.py, run by the reference venv (.refvenv: torch + torchvision),
never imported by project code: times torchvision's fasterrcnn_resnet50_fpn eager on the same weights
and images, one image per call.

  .refvenv/bin/python benchmarks/_tv_model.py --weights W.pth --threads 2 --repeats 2 IMAGES... > out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=600, max_size=1000)
    sd = torch.load(args.weights, map_location="cpu", weights_only=True)
    net.load_state_dict(sd, strict=False)
    net.eval()
    imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
            for p in args.images]
    times, dets = [], []
    with torch.no_grad():
        net([imgs[0]])  # warm-up
        for img in imgs:
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = net([img])[0]
                best = min(best, time.perf_counter() - t)
            times.append(best)
            dets.append({k: v.tolist() for k, v in out.items()})
    print(json.dumps({"times": times, "detections": dets, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
