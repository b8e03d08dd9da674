"""python -m model: checkpoint utilities.

  convert-torchvision WEIGHTS.pth --arch resnet50_fpn --num-classes 91 --out CKPT
  fetch coco-r50|coco-mnv3 --out CKPT [--url URL] [--sha256 HEX]   torchvision's COCO weights, checked
  info CKPT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.checkpoint import read_meta, save_checkpoint
from model.published import PUBLISHED, fetch
from model.torchvision_import import (
    ARCHS,
    class_names_for,
    download,
    load_torchvision,
    read_state_dict,
    torchvision_config,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("convert-torchvision", help="torchvision detection weights -> frcnn checkpoint")
    cv.add_argument("weights", nargs="?", help="local .pth/.safetensors state dict")
    cv.add_argument("--url", help="download the weights (needs a network); checked with --sha256")
    cv.add_argument("--sha256", help="expected sha256 (or its prefix) of the downloaded file")
    cv.add_argument("--arch", choices=ARCHS, required=True)
    cv.add_argument("--num-classes", type=int, default=91)
    cv.add_argument("--min-size", type=int)
    cv.add_argument("--max-size", type=int)
    cv.add_argument("--out", required=True, help="checkpoint directory to write")
    ft = sub.add_parser("fetch", help="torchvision's published COCO detector by name -> frcnn checkpoint")
    ft.add_argument("name", choices=sorted(PUBLISHED))
    ft.add_argument("--out", required=True, help="checkpoint directory to write (kept when already converted)")
    ft.add_argument("--url", help="fetch the same file from here instead (mirror, file://)")
    ft.add_argument("--sha256", help="expected sha256 instead of the recorded one")
    info = sub.add_parser("info", help="print a checkpoint's metadata")
    info.add_argument("checkpoint")
    args = ap.parse_args(argv)

    if args.cmd == "info":
        meta = read_meta(args.checkpoint)
        print(json.dumps({"config": meta.config.to_dict(), "class_names": meta.class_names,
                          "provenance": meta.provenance}, indent=2))
        return 0
    if args.cmd == "fetch":
        try:
            out = fetch(args.name, args.out, url=args.url, sha256=args.sha256)
        except (OSError, ValueError, RuntimeError) as exc:  # no network, wrong checksum, not these weights
            print(f"error: {args.name}: {exc}", file=sys.stderr)
            return 2
        print(f"checkpoint {out} ({PUBLISHED[args.name].arch}, COCO)")
        return 0
    if not args.weights and not args.url:
        ap.error("give a local WEIGHTS file or --url")
    path = Path(args.weights) if args.weights else download(
        args.url, Path.home() / ".cache" / "frcnn" / Path(args.url).name, args.sha256)
    cfg = torchvision_config(args.arch, args.num_classes, args.min_size, args.max_size)
    try:
        net = load_torchvision(read_state_dict(path), cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(args.out, net, cfg, class_names_for(args.num_classes),
                    {"source": "torchvision", "arch": args.arch, "weights": str(args.url or path)})
    print(f"wrote {args.out} ({args.arch}, {args.num_classes} classes, {cfg.transform.min_size}/{cfg.transform.max_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
