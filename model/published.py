"""torchvision's published COCO detectors by name: downloaded with their sha256, converted once.

    python -m model fetch coco-r50 --out CKPT [--url URL]     # resnet50_fpn, COCO box AP 37.0
    python -m model fetch coco-mnv3 --out CKPT [--url URL]    # mobilenet_v3_large_fpn, box AP 32.8

The weights download to $XDG_CACHE_HOME/frcnn/weights (default ~/.cache) and must match the
recorded sha256 before they are kept (a wrong file raises, nothing is cached). --url fetches the
same file from elsewhere (a mirror, a file:// copy); the checksum still applies unless --sha256
says otherwise. A second fetch into the same CKPT is a no-op when its provenance records the
same weights. `make serve MODEL=coco-r50` runs this, then `python -m export onnx --if-stale`,
then the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import read_meta, save_checkpoint
from model.torchvision_import import (
    class_names_for,
    download,
    load_torchvision,
    read_state_dict,
    torchvision_config,
)


@dataclass(frozen=True)
class Published:
    arch: str
    url: str
    sha256: str  # of the file; torchvision's file names carry its first 8 hex digits


# torchvision's COCO_V1 weights (torchvision.models.detection, FasterRCNN_*_Weights.COCO_V1).
PUBLISHED = {
    "coco-r50": Published(
        "resnet50_fpn", "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        "258fb6c638b15964ddcdd1ae0748c5eef1be9e732750120cc857feed3faac384"),
    "coco-mnv3": Published(
        "mobilenet_v3_large_fpn", "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
        "fb6a3cc702b1df54c18a44b26708cd083614211062d0c36d2ca7bf9270df3533"),
}


def weights_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "frcnn" / "weights"


def fetch(name: str, out: str | Path, *, url: str | None = None, sha256: str | None = None) -> Path:
    """Download, check, convert `name` (a key of PUBLISHED) into the checkpoint directory `out`."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown model {name!r}; published: {', '.join(PUBLISHED)}")
    pub, out = PUBLISHED[name], Path(out)
    want = (sha256 or pub.sha256).lower()
    if (out / "model.json").is_file() and read_meta(out).provenance.get("weights_sha256") == want:
        return out  # converted from these very weights before
    weights = download(url or pub.url, weights_cache() / Path(pub.url).name, want)
    cfg = torchvision_config(pub.arch, 91)
    net = load_torchvision(read_state_dict(weights), cfg)
    save_checkpoint(out, net, cfg, class_names_for(91),
                    {"source": "torchvision", "arch": pub.arch, "weights": url or pub.url, "weights_sha256": want})
    return out
