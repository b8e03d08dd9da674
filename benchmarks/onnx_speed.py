"""onnxruntime CPU vs torchvision eager on R50-FPN at 600/1000, side by side in one run.

    python -m benchmarks.onnx_speed [--checkpoint CKPT] [--onnx model.onnx] [--images DIR] [--n 6]
                                    [--threads 2] [--int8] [--profile] [--out results.json]

Same weights (a checkpoint; default: tools/parity_weights.py's deterministic R50 stand-in, since no
pretrained weights can be downloaded here) and the same COCO128 images, one image per call:
  torchvision   torchvision's fasterrcnn_resnet50_fpn, eager, in the reference venv (.refvenv)
  torch         this project's model, eager (fp32, and bf16 autocast when --bf16)
  ort           the exported graph in onnxruntime (CPU EP, all graph optimisations)
  ort-int8      (--int8) the graph with its convolutions and fc layers statically quantised
                (QDQ, per-channel int8 weights, calibrated on other COCO128 images)
Per image the best of --repeats runs is kept (the machine is shared); the summary is the mean of
those. --profile adds onnxruntime's per-operator time shares. Agreement with fp32 (match rate,
and AP with the fp32 detections as ground truth) is reported for every reduced-precision variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco128" / "train2017"
REFVENV_PY = ROOT / ".refvenv" / "bin" / "python"


def parity_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_weights import parity_state_dict, seeded_model

    from model.checkpoint import save_checkpoint
    from model.coco_names import COCO_91

    net = seeded_model()
    net.load_state_dict(parity_state_dict())
    return save_checkpoint(out, net, net.config, class_names=list(COCO_91), provenance={"source": "parity_weights"})


def time_calls(fn, images: list, repeats: int) -> list[float]:
    fn(images[0])  # warm-up
    out = []
    for img in images:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(img)
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out


def torchvision_times(net, paths: list[Path], threads: int, repeats: int) -> dict | None:
    if not REFVENV_PY.exists():
        print(f"({REFVENV_PY} missing: `make refvenv` for the torchvision column)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.pth"
        torch.save({k: v for k, v in net.state_dict().items()}, weights)
        cmd = [str(REFVENV_PY), str(ROOT / "benchmarks" / "_tv_model.py"), "--weights", str(weights),
               "--threads", str(threads), "--repeats", str(repeats), *map(str, paths)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def quantize_int8(onnx_path: Path, out: Path, calib_paths: list[Path], cfg) -> Path:
    """Static QDQ int8 (per-channel weights, uint8 activations) of Conv, Gemm and MatMul."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from export.verify import load_images
    from model.transform import preprocess

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib_paths)

        def get_next(self):
            p = next(self.items, None)
            if p is None:
                return None
            b = preprocess(load_images([p]), cfg.transform)
            return {"images": b.images.numpy(), "image_sizes": b.image_sizes.numpy().astype(np.int64)}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return out


def profile_shares(backend_cls, onnx_path: Path, batch, threads: int) -> list[tuple[str, float]]:
    """onnxruntime's profiler over one call: share of node time per operator type."""
    with tempfile.TemporaryDirectory() as tmp:
        be = backend_cls(onnx_path, intra_op_threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        be(batch.images, batch.image_sizes)
        trace = json.loads(Path(be.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + ev["dur"]
    total = sum(per_op.values()) or 1.0
    return sorted(((k, v / total) for k, v in per_op.items()), key=lambda kv: -kv[1])


def agreement(ref: list, other: list, class_names: list[str]) -> dict:
    """Match rate and AP of `other` with `ref`'s detections (score >= 0.5) as ground truth."""
    from export.verify import match_rate
    from train.evaluate import coco_metrics

    images, anns = [], []
    for i, d in enumerate(ref):
        images.append({"id": i, "width": 1000, "height": 1000})
        for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True):
            if score >= 0.5:
                x1, y1, x2, y2 = box
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label), "iscrowd": 0,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": n} for c, n in enumerate(class_names) if c > 0]}
    results = [{"image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(s)}
               for i, d in enumerate(other)
               for b, s, lab in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True)]
    return {"match_rate": match_rate(ref, other), "pseudo_AP": 100 * coco_metrics(gt, results)["AP"],
            "pseudo_gt_boxes": len(anns)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint dir (default: R50 parity stand-in weights)")
    ap.add_argument("--onnx", help="exported graph of the checkpoint (default: export it)")
    ap.add_argument("--images", default=str(COCO))
    ap.add_argument("--n", type=int, default=6, help="images timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also torch eager under bf16 autocast")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from export.onnx_export import export_onnx
    from export.verify import list_images, load_images
    from model.checkpoint import load_checkpoint
    from model.postprocess import postprocess
    from model.transform import preprocess
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    work = Path(tempfile.mkdtemp(prefix="onnx_speed_"))
    ckpt = Path(args.checkpoint) if args.checkpoint else parity_checkpoint(work / "r50-parity")
    onnx_path = Path(args.onnx) if args.onnx else export_onnx(ckpt, work / "model.onnx", verify=False)
    net, meta = load_checkpoint(ckpt)
    cfg = meta.config
    paths = list_images(args.images)
    test_paths, calib_paths = paths[: args.n], paths[args.n: args.n + 16]
    batches = [preprocess([img], cfg.transform) for img in load_images(test_paths)]
    post = dict(score_thresh=cfg.roi_heads.score_thresh, nms_thresh=cfg.roi_heads.nms_thresh,
                detections_per_img=cfg.roi_heads.detections_per_img, min_size=cfg.roi_heads.min_size)

    def detect(call):
        return [postprocess(call(b.images, b.image_sizes), b.image_sizes, b.original_sizes, **post)[0]
                for b in batches]

    results: dict = {"threads": args.threads, "images": [p.name for p in test_paths], "s_per_image": {}}
    variants: dict = {}

    def run(name, call):
        with torch.no_grad():
            results["s_per_image"][name] = time_calls(lambda b: call(b.images, b.image_sizes), batches, args.repeats)
            variants[name] = detect(call)

    tv = torchvision_times(net, test_paths, args.threads, args.repeats)
    if tv is not None:
        results["s_per_image"]["torchvision"] = tv["times"]
    ort_fp32 = OnnxRuntimeBackend(onnx_path, intra_op_threads=args.threads, inter_op_threads=1)
    run("ort", ort_fp32)
    run("torch", net)
    if args.bf16:
        def bf16(images, sizes):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                raw = net(images, sizes)
            return type(raw)(raw.batch_idx, raw.scores.float(), raw.boxes.float())
        run("torch-bf16", bf16)
    if args.int8:
        q = quantize_int8(onnx_path, work / "model.int8.onnx", calib_paths, cfg)
        run("ort-int8", OnnxRuntimeBackend(q, intra_op_threads=args.threads, inter_op_threads=1))
    mean = {k: sum(v) / len(v) for k, v in results["s_per_image"].items()}
    results["mean_s_per_image"] = mean
    if "torchvision" in mean:
        results["ratio_to_torchvision"] = {k: v / mean["torchvision"] for k, v in mean.items()}
    results["agreement_with_ort_fp32"] = {k: agreement(variants["ort"], v, meta.class_names)
                                          for k, v in variants.items() if k != "ort"}
    if args.profile:
        results["ort_profile"] = profile_shares(OnnxRuntimeBackend, onnx_path, batches[0], args.threads)[:12]
        if args.int8:
            results["ort_int8_profile"] = profile_shares(OnnxRuntimeBackend, work / "model.int8.onnx",
                                                         batches[0], args.threads)[:12]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
