"""Golden values from torchvision for the detector's parity tests. Runs in the reference venv
(`make refvenv`), never in the project's: torchvision is a reference only.

  .refvenv/bin/python tools/make_golden_model.py --weights .cache/r50_parity.pth --out tests/fixtures/tv_r50_golden.safetensors IMAGES...

Writes, for each image: torchvision's resized size, the first-stage proposals, and the final
detections of fasterrcnn_resnet50_fpn at min/max size 600/1000 (fasterrcnn_mobilenet_v3_large_fpn with --arch); plus anchors and a box-coder
round trip on fixed inputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


def load(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--arch", default="resnet50_fpn", choices=["resnet50_fpn", "mobilenet_v3_large_fpn"])
    ap.add_argument("--out", required=True)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(2)
    build = fasterrcnn_resnet50_fpn if args.arch == "resnet50_fpn" else fasterrcnn_mobilenet_v3_large_fpn
    net = build(weights=None, weights_backbone=None, num_classes=91, min_size=600, max_size=1000)
    sd = torch.load(args.weights, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()
    out: dict[str, torch.Tensor] = {}
    names = []
    imgs = [load(p) for p in args.images]
    with torch.no_grad():
        for path, img in zip(args.images, imgs):
            name = Path(path).stem
            names.append(name)
            il, _ = net.transform([img])
            feats = net.backbone(il.tensors)
            props, _ = net.rpn(il, feats)
            det = net([img])[0]
            out[f"{name}/image_size"] = torch.tensor(il.image_sizes[0])
            out[f"{name}/proposals"] = props[0]
            out[f"{name}/boxes"] = det["boxes"]
            out[f"{name}/scores"] = det["scores"]
            out[f"{name}/labels"] = det["labels"]
        # A batch of images of different sizes, as one call.
        for name, det in zip(names, net(imgs[:3])):
            out[f"batch3/{name}/boxes"] = det["boxes"]
            out[f"batch3/{name}/scores"] = det["scores"]
            out[f"batch3/{name}/labels"] = det["labels"]
        # Anchors of a 2-image padded batch (608 x 800) over a 5-level pyramid.
        gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        batch = torch.zeros(2, 3, 608, 800)
        fmaps = [torch.zeros(2, 8, 608 // s, 800 // s) for s in (4, 8, 16, 32, 64)]
        anchors = gen(ImageList(batch, [(600, 800), (500, 700)]), fmaps)[0]
        out["anchors/608x800"] = anchors
        # Box coder with the RoI-head weights on fixed inputs (large deltas exercise the clamp).
        g = torch.Generator().manual_seed(0)
        ref = torch.rand(50, 2, generator=g) * 500
        ref = torch.cat([ref, ref + 1 + torch.rand(50, 2, generator=g) * 300], 1)
        codes = torch.randn(50, 8, generator=g) * 3
        coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        out["coder/ref"] = ref
        out["coder/codes"] = codes
        out["coder/decoded"] = coder.decode(codes, [ref])
        gt = ref + torch.randn(50, 4, generator=g) * 5
        out["coder/gt"] = gt
        out["coder/encoded"] = coder.encode_single(gt, ref)
    meta = {"images": json.dumps(names), "torchvision": torchvision.__version__, "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in out.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(out)} tensors; detections per image:",
          [int(out[f'{n}/scores'].numel()) for n in names])


if __name__ == "__main__":
    main()
