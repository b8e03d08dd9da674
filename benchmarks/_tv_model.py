"""Helper for benchmarks/onnx_speed.py, run by the reference venv (.refvenv: torch + torchvision),
never imported by project code: torchvision's fasterrcnn_resnet50_fpn, eager, as a line server so
the benchmark can interleave its calls with the other variants' (fair timings on a shared machine).

  .refvenv/bin/python benchmarks/_tv_model.py --weights W.pth --threads 2
  stdin:  one image path per line  ->  stdout: {"s": seconds of net([image]), "n": detections}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=600, max_size=1000)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True), strict=False)
    net.eval()
    print(json.dumps({"ready": torch.__version__}), flush=True)
    for line in sys.stdin:
        img = Image.open(line.strip()).convert("RGB")
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            t = time.perf_counter()
            out = net([x])[0]
            s = time.perf_counter() - t
        print(json.dumps({"s": s, "n": len(out["scores"])}), flush=True)


if __name__ == "__main__":
    main()
