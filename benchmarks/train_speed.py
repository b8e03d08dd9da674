"""Training speed: images/second of one SGD step of a preset (default R50-FPN at 600/1000) on
COCO128 images, and, where .refvenv/bin/python exists, torchvision's training step on the same
batch (same images, same boxes, same sizes, FrozenBN ResNet-50 with all layers trainable, as ours).

    .venv/bin/python -m benchmarks.train_speed [--preset resnet50_fpn] [--batch 2] [--steps 3] [--threads 2]

Each side times `steps` steps (forward with losses, backward, SGD step) after one warm-up step,
with the same number of torch threads, and reports the median.
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
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"
REFVENV_PY = REPO / ".refvenv" / "bin" / "python"

# Runs inside the torchvision venv; reads the batch from a safetensors file, prints one JSON line.
_TV_SCRIPT = r"""
import json, statistics, sys, time
import torch
from safetensors.torch import load_file
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

path, batch, steps, threads, num_classes, min_size, max_size = sys.argv[1:8]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
data = load_file(path)
images = [data[f"image{i}"].float() / 255 for i in range(int(batch))]
targets = [{"boxes": data[f"boxes{i}"], "labels": data[f"labels{i}"]} for i in range(int(batch))]
body = resnet50(norm_layer=FrozenBatchNorm2d)
net = FasterRCNN(_resnet_fpn_extractor(body, 5), num_classes=int(num_classes),
                 min_size=int(min_size), max_size=int(max_size)).train()
opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
times = []
for i in range(int(steps) + 1):
    t0 = time.perf_counter()
    loss = sum(net(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_seconds": statistics.median(times[1:])}))
"""


def load_batch(n: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The first n COCO128 images with boxes (uint8 (3, h, w)), targets in original pixels."""
    from train.coco import CocoDetection

    ds = CocoDetection(images_dir=COCO128 / "train2017", annotations=COCO128 / "annotations" / "instances_train2017.json")
    images, targets = [], []
    for i in range(len(ds)):
        image, target = ds[i]
        if target["boxes"].numel():
            images.append(image)
            targets.append(target)
        if len(images) == n:
            break
    return images, targets


def ours(preset_name: str, images, targets, steps: int, num_classes: int) -> tuple[float, tuple[int, int]]:
    from model import build_model, preprocess, preset
    from train.data import resize_targets

    torch.manual_seed(0)
    cfg = preset(preset_name, num_classes=num_classes)
    net = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        batch = preprocess(images, cfg.transform)  # part of the step: torchvision's step resizes too
        losses, _ = net.losses(batch.images, batch.image_sizes,
                               resize_targets(targets, batch.image_sizes, batch.original_sizes))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), (cfg.transform.min_size, cfg.transform.max_size)


def torchvision_step(images, targets, steps: int, threads: int, num_classes: int, sizes: tuple[int, int]
                     ) -> float | None:
    if not REFVENV_PY.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.safetensors"
        tensors = {}
        for i, (im, t) in enumerate(zip(images, targets, strict=True)):
            tensors[f"image{i}"] = im.contiguous()
            tensors[f"boxes{i}"] = t["boxes"].contiguous()
            tensors[f"labels{i}"] = t["labels"].contiguous()
        save_file(tensors, str(path))
        proc = subprocess.run([str(REFVENV_PY), "-c", _TV_SCRIPT, str(path), str(len(images)), str(steps),
                               str(threads), str(num_classes), str(sizes[0]), str(sizes[1])],
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"torchvision side failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_seconds"]


def run_train_speed(preset_name: str = "resnet50_fpn", batch: int = 2, steps: int = 3, threads: int = 2,
                    with_torchvision: bool = True) -> list[dict]:
    torch.set_num_threads(threads)
    images, targets = load_batch(batch)
    num_classes = 91
    step, sizes = ours(preset_name, images, targets, steps, num_classes)
    row = {"preset": preset_name, "min_size": sizes[0], "max_size": sizes[1], "batch": batch, "threads": threads,
           "step_seconds": round(step, 3), "images_per_second": round(batch / step, 3)}
    if with_torchvision and preset_name == "resnet50_fpn":
        tv = torchvision_step(images, targets, steps, threads, num_classes, sizes)
        if tv is not None:
            row.update(torchvision_step_seconds=round(tv, 3), torchvision_images_per_second=round(batch / tv, 3),
                       speed_ratio_vs_torchvision=round(tv / step, 3))  # > 1: we are faster
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="resnet50_fpn")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torchvision", action="store_true")
    a = p.parse_args()
    for row in run_train_speed(a.preset, a.batch, a.steps, a.threads, not a.no_torchvision):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
