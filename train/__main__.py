"""python -m train: train a detector, or `python -m train evaluate` a detections file.

    python -m train --data synthetic-shapes --preset tiny --out runs/shapes
    python -m train --data ../shared/data/coco128 --init checkpoints/demo-tiny-shapes --out runs/c128 \\
        --epochs 12 --set transform.min_size=320 transform.max_size=512 train.threads=1
    python -m train --resume runs/shapes
    torchrun --nproc_per_node 2 -m train --data synthetic-shapes --preset tiny --out runs/ddp
    python -m train evaluate --annotations GT.json --detections DETS.json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys


def _evaluate_main(argv: list[str]) -> int:
    from train.evaluate import evaluate_files

    p = argparse.ArgumentParser(prog="python -m train evaluate",
                                description="COCO box metrics (pycocotools) of a detections json.")
    p.add_argument("--annotations", required=True, help="COCO ground-truth json")
    p.add_argument("--detections", required=True, help="COCO results json: [{image_id, category_id, bbox, score}]")
    p.add_argument("--out", help="also write the metrics json here")
    a = p.parse_args(argv)
    print(json.dumps(evaluate_files(a.annotations, a.detections, a.out), indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="'synthetic-shapes', a COCO folder (annotations/instances_<split>.json + "
                                  "<split>/), or a COCO json with --images DIR")
    p.add_argument("--train-annotations")
    p.add_argument("--train-images", "--images", dest="train_images", help="image folder of the training json")
    p.add_argument("--val-annotations", "--val", dest="val_annotations", help="validation COCO json")
    p.add_argument("--val-images")
    p.add_argument("--synthetic-sizes", metavar="TRAIN,VAL", help="synthetic-shapes image counts (default 512,128)")
    p.add_argument("--preset", default="resnet50_fpn", help="model preset (ignored with --init)")
    p.add_argument("--init", "--checkpoint", dest="init", help="checkpoint dir to fine-tune from; the "
                   "predictor is re-initialised when the class count differs")
    p.add_argument("--out", help="RUN_DIR")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="model config (rpn.nms_thresh=0.6) or train.* (train.lr=0.01) overrides")
    p.add_argument("--freeze", help="comma-separated parameter-name prefixes to keep frozen, e.g. backbone.body.layer1,rpn")
    p.add_argument("--scheme", choices=("end2end", "alternating"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="base lr for a total batch of train.base_batch (16)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--deterministic", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    from train.data import DataSpec
    from train.run import make_spec, resume, start

    p = _parser()
    a = p.parse_args(argv)
    overrides = [o for group in a.overrides for o in group]
    shortcuts = {"scheme": a.scheme, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
                 "num_workers": a.workers, "amp": a.amp, "deterministic": True if a.deterministic else None,
                 "freeze": a.freeze}
    if a.resume:
        extra = [o.removeprefix("train.") for o in overrides if o.startswith("train.")]
        if any(not o.startswith("train.") for o in overrides):
            p.error("--resume takes only train.* overrides; the model is the checkpoint's")
        extra += [f"{k}={v}" for k, v in shortcuts.items() if v is not None and k != "freeze"]
        result = resume(a.resume, extra, device=a.device if a.device != "auto" else None)
    else:
        if not a.data or not a.out:
            p.error("--data and --out are required (or --resume RUN_DIR)")
        from train.schemes import parse_patterns

        kwargs = {k: v for k, v in shortcuts.items() if v is not None}
        if "freeze" in kwargs:
            kwargs["freeze"] = parse_patterns(kwargs["freeze"])
        sizes = [int(v) for v in a.synthetic_sizes.split(",")] if a.synthetic_sizes else [None, None]
        data = DataSpec(source=a.data, train_annotations=a.train_annotations, train_images=a.train_images,
                        val_annotations=a.val_annotations, val_images=a.val_images,
                        synthetic_train_size=sizes[0], synthetic_val_size=sizes[1])
        spec = make_spec(data=data, out=a.out, preset=a.preset, seed=a.seed, overrides=overrides, init=a.init,
                         device=a.device, train_kwargs=kwargs)
        result = start(spec)
    if result.metrics:
        last = result.metrics[-1]
        print(json.dumps({k: last[k] for k in ("epoch", "iteration", "loss", "AP", "AP50") if k in last}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
