"""python -m train: `fit` a detector (the default command) or `evaluate` a detections file.

    python -m train --data synthetic-shapes --preset tiny --out runs/shapes      # = python -m train fit ...
    python -m train fit --data ../shared/data/coco128 --checkpoint checkpoints/demo-tiny-shapes \\
        --out runs/c128 --epochs 12 --threads 1 --set transform.min_size=320 transform.max_size=512
    python -m train fit --resume runs/shapes
    torchrun --nproc_per_node 2 -m train fit --data synthetic-shapes --preset tiny --out runs/ddp
    python -m train evaluate --annotations GT.json --detections DETS.json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = ("fit", "train", "evaluate")  # "train": an alias of fit


class _DeprecatedAlias(argparse.Action):
    """An old spelling kept for one release: it works and says what replaces it (on stderr)."""

    def __init__(self, option_strings, dest, *, use: str, **kwargs):
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated and will be removed; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="'synthetic-shapes', a COCO folder (annotations/instances_<split>.json + "
                                  "<split>/), or a COCO json with --images DIR")
    p.add_argument("--train-annotations")
    p.add_argument("--train-images", "--images", dest="train_images", help="image folder of the training json")
    p.add_argument("--val-annotations", "--val", dest="val_annotations", help="validation COCO json")
    p.add_argument("--val-images")
    p.add_argument("--synthetic-sizes", metavar="TRAIN,VAL", help="synthetic-shapes image counts (default 512,128)")
    p.add_argument("--preset", default="resnet50_fpn", help="model preset (ignored with --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint dir training starts from (fine-tuning); the predictor is "
                                        "re-initialised when the class count differs")
    p.add_argument("--init", dest="checkpoint", action=_DeprecatedAlias, use="--checkpoint", help=argparse.SUPPRESS)
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
    p.add_argument("--threads", type=int, help="intra-op threads (train.threads)")
    p.add_argument("--score-threshold", type=float,
                   help="minimum detection score of the model (roi_heads.score_thresh): validation and serving")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--deterministic", action="store_true")


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, help="COCO ground-truth json")
    p.add_argument("--detections", required=True, help="COCO results json: [{image_id, category_id, bbox, score}]")
    p.add_argument("--out", help="also write the metrics json here")


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the top-level parser, each command's parser by command name, aliases included)."""
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{fit,evaluate}")
    fit = sub.add_parser("fit", aliases=["train"], help="train a detector (the default without a command)",
                         description="Train a detector, or continue a run with --resume.")
    _add_fit_arguments(fit)
    ev = sub.add_parser("evaluate", help="COCO box metrics (pycocotools) of a detections json",
                        description="COCO box metrics (pycocotools) of a detections json.")
    _add_evaluate_arguments(ev)
    return p, {"fit": fit, "train": fit, "evaluate": ev}


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """(arguments, the parser of their command). Without a command the arguments are fit's."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["fit", *argv]  # `python -m train --data ...` trains, as before the subcommands
    top, by_command = parsers()
    a = top.parse_args(argv)
    return a, by_command[a.command]


def _shortcuts(a: argparse.Namespace) -> dict:
    """Train-config values named by their own options (None: not given)."""
    return {"scheme": a.scheme, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
            "num_workers": a.workers, "threads": a.threads, "amp": a.amp,
            "deterministic": True if a.deterministic else None, "freeze": a.freeze}


def new_run_spec(a: argparse.Namespace, p: argparse.ArgumentParser):
    """The RunSpec of a new run from fit's arguments (p reports usage errors)."""
    if not a.data or not a.out:
        p.error("--data and --out are required (or --resume RUN_DIR)")
    from train.data import DataSpec
    from train.run import make_spec
    from train.schemes import parse_patterns

    overrides = [o for group in a.overrides for o in group]
    if a.score_threshold is not None:
        overrides.append(f"roi_heads.score_thresh={a.score_threshold}")
    kwargs = {k: v for k, v in _shortcuts(a).items() if v is not None}
    if "freeze" in kwargs:
        kwargs["freeze"] = parse_patterns(kwargs["freeze"])
    sizes = [int(v) for v in a.synthetic_sizes.split(",")] if a.synthetic_sizes else [None, None]
    data = DataSpec(source=a.data, train_annotations=a.train_annotations, train_images=a.train_images,
                    val_annotations=a.val_annotations, val_images=a.val_images,
                    synthetic_train_size=sizes[0], synthetic_val_size=sizes[1])
    return make_spec(data=data, out=a.out, preset=a.preset, seed=a.seed, overrides=overrides,
                     checkpoint=a.checkpoint, device=a.device, train_kwargs=kwargs)


def resume_overrides(a: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """The train.* overrides --resume may apply (the model is the run's own checkpoint)."""
    overrides = [o for group in a.overrides for o in group]
    if any(not o.startswith("train.") for o in overrides) or a.score_threshold is not None:
        p.error("--resume takes only train.* overrides; the model is the checkpoint's")
    if a.checkpoint:
        p.error("--resume continues RUN_DIR's own last checkpoint; --checkpoint starts a new run")
    extra = [o.removeprefix("train.") for o in overrides]
    return extra + [f"{k}={v}" for k, v in _shortcuts(a).items() if v is not None and k != "freeze"]


def main(argv: list[str] | None = None) -> int:
    a, p = parse(sys.argv[1:] if argv is None else argv)
    if a.command == "evaluate":
        from train.evaluate import evaluate_files

        print(json.dumps(evaluate_files(a.annotations, a.detections, a.out), indent=2))
        return 0
    from train.loop import resume, start

    if a.resume:
        result = resume(a.resume, resume_overrides(a, p), device=a.device if a.device != "auto" else None)
    else:
        result = start(new_run_spec(a, p))
    if result.metrics:
        last = result.metrics[-1]
        print(json.dumps({k: last[k] for k in ("epoch", "iteration", "loss", "AP", "AP50") if k in last}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
