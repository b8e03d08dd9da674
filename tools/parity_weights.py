"""Deterministic stand-in weights for torchvision parity checks (no pretrained weights can be
downloaded here).

A seeded ``resnet50_fpn`` (or ``mobilenet_v3_large_fpn``) whose frozen-BN statistics were calibrated once on COCO128 photos (so
activations stay in a trained network's range; the statistics are committed in
tests/fixtures/<arch>_parity_bnstats.safetensors) and whose classifier is scaled so that scores pass
0.05. The detections mean nothing; they exercise every number of the pipeline.

  python tools/parity_weights.py [--arch resnet50_fpn] --out FILE.pth [--calibrate IMAGES...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.backbones.norm import FrozenBatchNorm2d
from model.config import preset
from model.detector import FasterRCNN, build_model
from model.transform import preprocess

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 20261121
ARCHS = ("resnet50_fpn", "mobilenet_v3_large_fpn")


def bn_stats_path(arch: str) -> Path:
    return FIXTURES / ("r50_parity_bnstats.safetensors" if arch == "resnet50_fpn" else f"{arch}_parity_bnstats.safetensors")


def seeded_model(arch: str = "resnet50_fpn") -> FasterRCNN:
    torch.manual_seed(SEED)
    net = build_model(preset(arch, num_classes=91)).eval()
    with torch.no_grad():
        # scaled per backbone so that class scores spread over (0.05, 1)
        net.roi_heads.box_predictor.cls_score.weight.normal_(std=0.04 if arch == "resnet50_fpn" else 0.3)
        net.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.02)
        net.rpn.head.cls_logits.weight.normal_(std=0.1)
        net.rpn.head.bbox_pred.weight.normal_(std=0.02)
    return net


def calibrate(net: FasterRCNN, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set each frozen BN's statistics to its input's per-channel mean/var, in forward order."""
    hooks = []

    def pre_hook(mod: FrozenBatchNorm2d, args):
        x = args[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.2, 0.2)

    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(pre_hook))
    batch = preprocess(images, net.config.transform)
    with torch.no_grad():
        net.backbone(batch.images)
    for h in hooks:
        h.remove()
    return {k: v.clone() for k, v in net.state_dict().items()
            if any(k.endswith(s) for s in ("running_mean", "running_var", ".weight", ".bias"))
            and _is_bn_key(net, k)}


def _is_bn_key(net: FasterRCNN, key: str) -> bool:
    mod = net.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(mod, FrozenBatchNorm2d)


def parity_state_dict(arch: str = "resnet50_fpn") -> dict[str, torch.Tensor]:
    net = seeded_model(arch)
    stats = load_file(str(bn_stats_path(arch)))
    net.load_state_dict(stats, strict=False)
    return net.state_dict()


def save_parity_checkpoint(out: str | Path, arch: str = "resnet50_fpn") -> Path:
    """The stand-in weights as a user's checkpoint: converted through model.torchvision_import (the
    path torchvision's published weights take) at 600/1000 with COCO's 91 class names. The R50 that
    the tests, the server benchmarks and the precision benchmark serve."""
    from model.checkpoint import save_checkpoint
    from model.torchvision_import import class_names_for, load_torchvision, torchvision_config

    cfg = torchvision_config(arch, 91, min_size=600, max_size=1000)
    return save_checkpoint(out, load_torchvision(parity_state_dict(arch), cfg), cfg, class_names_for(91),
                           provenance={"source": "tools/parity_weights.py"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50_fpn", choices=ARCHS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calibrate", nargs="*", help="images to (re)calibrate the BN statistics on")
    args = ap.parse_args()
    if args.calibrate:
        import numpy as np
        from PIL import Image

        imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in args.calibrate]
        save_file(calibrate(seeded_model(args.arch), imgs), str(bn_stats_path(args.arch)))
        print(f"wrote {bn_stats_path(args.arch)}")
    torch.save(parity_state_dict(args.arch), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
