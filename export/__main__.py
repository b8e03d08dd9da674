"""python -m export {onnx, verify, tensorrt, triton}: thin argument parsing over export/*.

    python -m export onnx --checkpoint CKPT --out model.onnx [--opset 18] [--with-nms] [--max-detections K] [--if-stale]
                          [--precision fp32|fp16|int8] [--calib-images DIR] [--calib-count N]
    python -m export verify --checkpoint CKPT --model model.onnx --images DIR [--annotations GT]
    python -m export tensorrt --model model[.fp16|.int8].onnx --out model.engine   (precision: the graph's)
    python -m export triton --checkpoint CKPT --repo DIR [--name frcnn] [--raw]   (or --model model.onnx|.engine)
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("onnx", help="export a checkpoint to ONNX (dynamic batch and image size)")
    o.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + model.json)")
    o.add_argument("--out", required=True, help="output .onnx path")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--with-nms", action="store_true", help="class-wise NMS and top-K in the graph")
    o.add_argument("--max-detections", type=int, default=100, help="K: rows per image with --with-nms")
    o.add_argument("--no-verify", action="store_true", help="skip the post-export parity gate (unverified graph)")
    o.add_argument("--if-stale", action="store_true",
                   help="do nothing when --out was exported from this checkpoint by this export code")
    o.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="what the graph computes in (every runtime runs it so); each has its own gate")
    o.add_argument("--calib-images", help="int8: directory of real images to calibrate on (then gated on others)")
    o.add_argument("--calib-count", type=int, default=32, help="int8: calibrate on the first N images")
    o.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="int8 activation ranges (minmax lost the least AP, README)")

    v = sub.add_parser("verify", help="parity of an exported model with its checkpoint")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--model", required=True, help=".onnx or .engine")
    v.add_argument("--images", required=True, help="directory of images")
    v.add_argument("--annotations", help="COCO json: also compare box AP")
    v.add_argument("--batch-size", type=int, default=2)
    v.add_argument("--limit", type=int, default=None, help="first N images only")

    t = sub.add_parser("tensorrt", help="build a strongly typed TensorRT 10/11 engine from an exported .onnx")
    t.add_argument("--model", required=True, help=".onnx from `export onnx` (its --precision is the engine's)")
    t.add_argument("--out", required=True, help="output .engine (a .json sidecar is written beside it)")
    for gone in ("--fp16", "--int8"):  # precision moved into the graph (TensorRT 11 removed these flags)
        t.add_argument(gone, action="store_true", help=argparse.SUPPRESS)
    for gone in ("--calib-images", "--calib-cache", "--calib-batches"):
        t.add_argument(gone, help=argparse.SUPPRESS)
    t.add_argument("--timing-cache", help="timing cache file (read if present, updated after the build)")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, default=4)
    t.add_argument("--max-batch", type=int, default=8)
    t.add_argument("--min-hw", type=int, nargs=2, default=(320, 320), metavar=("H", "W"))
    t.add_argument("--opt-hw", type=int, nargs=2, default=(608, 1024), metavar=("H", "W"))
    t.add_argument("--max-hw", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    t.add_argument("--workspace-gb", type=float, default=4.0)

    r = sub.add_parser("triton", help="write a Triton model repository (default: the batchable --with-nms graph)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint to export (the --with-nms graph unless --raw)")
    src.add_argument("--model", help="an exported .onnx or .engine, either flavour")
    r.add_argument("--repo", required=True, help="model repository directory")
    r.add_argument("--raw", action="store_true", help="with --checkpoint: the raw graph (Triton cannot batch it)")
    r.add_argument("--max-detections", type=int, default=100, help="K: rows per image of the NMS graph")
    r.add_argument("--no-verify", action="store_true", help="with --checkpoint: skip the parity gate")
    r.add_argument("--name", default="frcnn")
    r.add_argument("--max-batch-size", type=int, default=8)
    r.add_argument("--instances", type=int, default=1)
    r.add_argument("--kind", choices=("cpu", "gpu"), default=None, help="instance kind (default: by backend)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    from export.verify import GateFailed

    try:
        return _run(args)
    except GateFailed as exc:  # the graph disagrees with its checkpoint: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ImportError, FileNotFoundError, ValueError) as exc:  # missing TensorRT, paths, bad settings
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "onnx":
        from export.onnx_export import export_onnx, is_fresh

        if args.precision == "int8" and not args.calib_images:  # before a minutes-long export, not after it
            raise ValueError("int8 needs calibration images: --calib-images DIR (photos like the ones served)")
        if args.if_stale and is_fresh(args.out, args.checkpoint) and _graph_precision(args.out) == args.precision:
            print(f"up to date: {args.out}")
            return 0
        path = export_onnx(args.checkpoint, args.out, opset=args.opset, with_nms=args.with_nms,
                           max_detections=args.max_detections, verify=not args.no_verify,
                           precision=args.precision, calib_images=args.calib_images, calib_count=args.calib_count,
                           calib_method=args.calib_method)
        print(f"wrote {path}")
        return 0
    if args.command == "verify":
        from export.verify import verify

        report = verify(args.checkpoint, args.model, args.images, annotations=args.annotations,
                        batch_size=args.batch_size, limit=args.limit)
        print(report.to_json())
        if not report.ok:
            from export.verify import failure_message

            print(f"error: {failure_message(report, args.model)}", file=sys.stderr)
            return 1
        return 0
    if args.command == "tensorrt":
        from export.tensorrt import BuildOptions, build_engine

        if args.fp16 or args.int8 or args.calib_images or args.calib_cache or args.calib_batches:
            want = "fp16" if args.fp16 else "int8"
            print(f"error: precision is decided in the ONNX graph now, not by the engine builder (TensorRT 11 "
                  f"removed its precision flags and calibrators). Export the {want} graph first:\n"
                  f"  python -m export onnx --checkpoint CKPT --out model.{want}.onnx --precision {want}"
                  + (" --calib-images DIR" if want == "int8" else "")
                  + f"\nthen: python -m export tensorrt --model model.{want}.onnx --out {args.out}", file=sys.stderr)
            return 2
        opts = BuildOptions(
            timing_cache=args.timing_cache,
            min_shape=(args.min_batch, *args.min_hw), opt_shape=(args.opt_batch, *args.opt_hw),
            max_shape=(args.max_batch, *args.max_hw), workspace_gb=args.workspace_gb,
        )
        path = build_engine(args.model, args.out, opts)
        print(f"wrote {path}")
        return 0
    if args.command == "triton":
        from export.triton import write_model_repository, write_repository_from_checkpoint

        common = dict(name=args.name, max_batch_size=args.max_batch_size, instances=args.instances, kind=args.kind)
        if args.checkpoint:
            path = write_repository_from_checkpoint(args.checkpoint, args.repo, raw=args.raw,
                                                    max_detections=args.max_detections,
                                                    verify=not args.no_verify, **common)
        else:
            path = write_model_repository(args.model, args.repo, **common)
        print(f"wrote {path}")
        return 0
    return 2


def _graph_precision(path: str) -> str | None:
    """The "precision" recorded in an existing graph's metadata; None when there is no such graph."""
    from pathlib import Path

    if not Path(path).is_file():
        return None
    import onnx

    from export.precision import precision_of

    return precision_of(onnx.load(path, load_external_data=False))


if __name__ == "__main__":
    sys.exit(main())
