"""onnxruntime CPU vs torchvision eager on R50-FPN at 600/1000, side by side in one run.

    python -m benchmarks.onnx_speed [--checkpoint CKPT] [--onnx model.onnx] [--images DIR] [--n 6]
                                    [--threads 2] [--int8] [--bf16] [--profile]
                                    [--ap-checkpoint SHAPES_CKPT] [--out results.json]

Same weights (a checkpoint; default: tools/parity_weights.py's deterministic R50 stand-in, since no
pretrained weights can be downloaded here) and the same COCO128 images, one image per call, each
variant timed end to end (preprocess, network, postprocess -- what torchvision's net([img]) does):
  torchvision   torchvision's fasterrcnn_resnet50_fpn, eager, in the reference venv (.refvenv)
  torch         this project's model, eager (and bf16 autocast with --bf16)
  ort           the exported graph in onnxruntime (CPU EP, all graph optimisations)
  ort-int8      (--int8) backbone/FPN/RPN-conv convolutions and box-head fc layers statically quantised
                (QDQ, per-channel int8 weights, calibrated on 16 other COCO128 images)
The variants run interleaved (image by image, round by round) and each keeps its best of --repeats,
so load from other processes on a shared machine hits them alike. --profile adds onnxruntime's
per-operator time shares. Agreement with ort fp32 is reported for every other variant; since the
stand-in weights' scores mean nothing, --ap-checkpoint measures what precision costs in box AP on a
detector trained on synthetic shapes (real ground truth).
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


class TorchvisionServer:
    """torchvision eager in the reference venv, one image per request (benchmarks/_tv_model.py)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], threads: int, work: Path):
        weights = work / "tv_weights.pth"
        torch.save(dict(state_dict), weights)
        cmd = [str(REFVENV_PY), str(ROOT / "benchmarks" / "_tv_model.py"), "--weights", str(weights),
               "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(self.proc.stdout.readline())  # {"ready": ...}

    def __call__(self, path: Path) -> float:
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved_times(variants: dict, paths: list[Path], repeats: int) -> dict[str, list[float]]:
    """variants: name -> fn(path) -> seconds. Per image, every variant runs once per round, rounds
    repeated, the best kept: load changes on a shared machine hit all variants alike."""
    for fn in variants.values():
        fn(paths[0])  # warm-up
    best = {name: [float("inf")] * len(paths) for name in variants}
    for i, p in enumerate(paths):
        for _ in range(repeats):
            for name, fn in variants.items():
                best[name][i] = min(best[name][i], fn(p))
    return best


def quantize_int8(onnx_path: Path, out: Path, calib_batches: list[dict]) -> Path:
    """Static QDQ int8 (per-channel symmetric int8 weights, uint8 activations) of the backbone/FPN
    convolutions, the RPN's shared 3x3 conv and the box head's fc6/fc7; the RPN's 1x1 outputs and
    the box predictor stay fp32 (they rank proposals and classes, where int8 rounding reorders
    near-equal scores)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib_batches)

        def get_next(self):
            return next(self.items, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    m = onnx.load(str(pre), load_external_data=False)
    weights = {i.name for i in m.graph.initializer}
    # weight names survive BN folding as e.g. "ConvMulFusion_W_net.backbone.body.conv1.weight"
    parts = ("net.backbone.", "net.rpn.head.conv.", "net.roi_heads.box_head.")
    wanted = [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
              and any(w in weights and any(p in w for p in parts) for w in n.input)]
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_quantize=wanted,
                    extra_options={"WeightSymmetric": True})
    return out


def ap_cost(ckpt: Path, work: Path, threads: int, n_val: int = 128) -> dict:
    """Box AP on SyntheticShapes val (real ground truth) of a checkpoint trained on it, per precision:
    torch fp32, torch bf16 autocast, onnxruntime fp32, onnxruntime int8 (calibrated on train images)."""
    from export.onnx_export import export_onnx
    from model.checkpoint import load_checkpoint
    from model.postprocess import postprocess
    from model.transform import preprocess
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from train.evaluate import coco_metrics, detections_to_coco
    from train.shapes import SyntheticShapes

    net, meta = load_checkpoint(ckpt)
    cfg = meta.config
    onnx_path = export_onnx(ckpt, work / "ap.onnx", verify=False)
    val = SyntheticShapes(split="val", size=n_val)
    train = SyntheticShapes(split="train", size=32)
    calib = [preprocess([train[i][0]], cfg.transform) for i in range(len(train))]
    int8 = quantize_int8(onnx_path, work / "ap.int8.onnx",
                         [{"images": b.images.numpy(), "image_sizes": b.image_sizes.numpy()} for b in calib])

    def bf16(images, sizes):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            raw = net(images, sizes)
        return type(raw)(raw.batch_idx, raw.scores.float(), raw.boxes.float())

    variants = {"torch": net, "torch-bf16": bf16,
                "ort": OnnxRuntimeBackend(onnx_path, intra_op_threads=threads),
                "ort-int8": OnnxRuntimeBackend(int8, intra_op_threads=threads)}
    out = {}
    for name, call in variants.items():
        results = []
        for s in range(0, len(val), 4):
            items = [val[i] for i in range(s, min(s + 4, len(val)))]
            b = preprocess([im for im, _ in items], cfg.transform)
            with torch.no_grad():
                dets = postprocess(call(b.images, b.image_sizes), b.image_sizes, b.original_sizes,
                                   score_thresh=0.05, nms_thresh=cfg.roi_heads.nms_thresh,
                                   detections_per_img=100, min_size=cfg.roi_heads.min_size)
            results += detections_to_coco(dets, [t["image_id"] for _, t in items], val.label_to_category_id)
        m = coco_metrics(val.coco_gt(), results)
        out[name] = {"AP": round(100 * m["AP"], 2), "AP50": round(100 * m["AP50"], 2)}
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
    ap.add_argument("--ap-checkpoint", help="a checkpoint trained on synthetic shapes: AP per precision")
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
    results: dict = {"threads": args.threads}
    if args.ap_checkpoint:
        results["ap_synthetic_shapes"] = ap_cost(Path(args.ap_checkpoint), work, args.threads)
    ckpt = Path(args.checkpoint) if args.checkpoint else parity_checkpoint(work / "r50-parity")
    onnx_path = Path(args.onnx) if args.onnx else export_onnx(ckpt, work / "model.onnx", verify=False)
    net, meta = load_checkpoint(ckpt)
    cfg, rh = meta.config, meta.config.roi_heads
    paths = list_images(args.images)
    test_paths, calib_paths = paths[: args.n], paths[args.n: args.n + 16]
    images = dict(zip(test_paths, load_images(test_paths), strict=True))
    results["images"] = [p.name for p in test_paths]

    def end_to_end(call, keep: dict):
        """path -> seconds of preprocess + call + postprocess (what torchvision's net([img]) does)."""
        def run(path):
            t = time.perf_counter()
            b = preprocess([images[path]], cfg.transform)
            with torch.no_grad():
                raw = call(b.images, b.image_sizes)
            keep[path] = postprocess(raw, b.image_sizes, b.original_sizes, score_thresh=rh.score_thresh,
                                     nms_thresh=rh.nms_thresh, detections_per_img=rh.detections_per_img,
                                     min_size=rh.min_size)[0]
            return time.perf_counter() - t
        return run

    dets: dict[str, dict] = {}
    variants = {}
    tv = TorchvisionServer(net.state_dict(), args.threads, work) if REFVENV_PY.exists() else None
    if tv is not None:
        variants["torchvision"] = tv
    for name, call in (("ort", OnnxRuntimeBackend(onnx_path, intra_op_threads=args.threads, inter_op_threads=1)),
                       ("torch", net)):
        variants[name] = end_to_end(call, dets.setdefault(name, {}))
    if args.bf16:
        def bf16(images_, sizes):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                raw = net(images_, sizes)
            return type(raw)(raw.batch_idx, raw.scores.float(), raw.boxes.float())
        variants["torch-bf16"] = end_to_end(bf16, dets.setdefault("torch-bf16", {}))
    if args.int8:
        calib = [preprocess(load_images([p]), cfg.transform) for p in calib_paths]
        q = quantize_int8(onnx_path, work / "model.int8.onnx",
                          [{"images": b.images.numpy(), "image_sizes": b.image_sizes.numpy()} for b in calib])
        variants["ort-int8"] = end_to_end(OnnxRuntimeBackend(q, intra_op_threads=args.threads, inter_op_threads=1),
                                          dets.setdefault("ort-int8", {}))
    results["s_per_image"] = interleaved_times(variants, test_paths, args.repeats)
    if tv is not None:
        tv.close()
    mean = {k: sum(v) / len(v) for k, v in results["s_per_image"].items()}
    results["mean_s_per_image"] = mean
    if "torchvision" in mean:
        results["ratio_to_torchvision"] = {k: v / mean["torchvision"] for k, v in mean.items()}
    ref = [dets["ort"][p] for p in test_paths]
    results["agreement_with_ort_fp32"] = {k: agreement(ref, [v[p] for p in test_paths], meta.class_names)
                                          for k, v in dets.items() if k != "ort"}
    if args.profile:
        batch = preprocess([images[test_paths[0]]], cfg.transform)
        results["ort_profile"] = profile_shares(OnnxRuntimeBackend, onnx_path, batch, args.threads)[:12]
        if args.int8:
            results["ort_int8_profile"] = profile_shares(OnnxRuntimeBackend, work / "model.int8.onnx", batch,
                                                         args.threads)[:12]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
