"""python -m runtime: detections for images or folders of images, offline, as JSON.

  python -m runtime --model CKPT_DIR|model.onnx|model.engine [--backend auto] [--batch-size N]
                    [--score-threshold T] [--max-detections K] [--out FILE] IMAGE_OR_DIR...

Writes a JSON list, one entry per image: {"image", "width", "height", "boxes" (xyxy, original
pixels), "scores", "labels" (class ids), "label_names"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.backends import BACKENDS
from runtime.images import IMAGE_SUFFIXES, ImageError, load_image
from runtime.pipeline import Pipeline


def collect_images(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return paths


def _load(path: Path):
    try:
        return load_image(path)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def predict_files(pipe: Pipeline, paths: list[Path], *, batch_size: int = 1, score_threshold: float | None = None,
                  max_detections: int | None = None) -> list[dict]:
    """Detections per file, in order. Images are batched (up to batch_size) only with images of the
    same padded size, so each answer equals the image's one-image answer."""
    options = pipe.options(score_threshold, max_detections)
    results = []
    chunk = batch_size * 8  # files decoded at once: bounds memory while leaving sizes to group
    for start in range(0, len(paths), chunk):
        names = paths[start:start + chunk]
        images = [_load(p) for p in names]
        dets = pipe.predict(images, options, batch_size=batch_size)
        for path, img, d in zip(names, images, dets, strict=True):
            labels = d.labels.tolist()
            results.append({"image": path.name, "width": int(img.shape[1]), "height": int(img.shape[0]),
                            "boxes": [[round(v, 2) for v in box] for box in d.boxes.tolist()],
                            "scores": [round(s, 5) for s in d.scores.tolist()], "labels": labels,
                            "label_names": [pipe.class_names[i] for i in labels]})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ap.add_argument("--model", required=True, help="checkpoint dir, .onnx or .engine")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--device", default="cpu", help="torch backend device (cpu, cuda)")
    ap.add_argument("--providers", help="onnxruntime execution providers, comma-separated in order "
                    "(cpu, cuda, tensorrt; default: the best available)")
    ap.add_argument("--no-winograd", dest="winograd", action="store_false",
                    help="onnxruntime on CPU: direct 3x3 convolutions instead of Winograd F(4x4, 3x3)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--score-threshold", type=float)
    ap.add_argument("--max-detections", type=int)
    ap.add_argument("--threads", type=int, help="intra-op threads")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    try:
        paths = collect_images(args.inputs)
        providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        pipe = Pipeline.load(args.model, backend=args.backend, device=args.device, threads=args.threads,
                             providers=providers, winograd=None if args.winograd else False)
        convs = getattr(pipe.backend, "winograd_convs", 0)
        print(f"model {pipe.model_name}: {pipe.backend_name} backend, {pipe.precision}"
              + (f", Winograd F(4x4, 3x3) on {convs} convolutions" if convs else ""), file=sys.stderr)
        results = predict_files(pipe, paths, batch_size=args.batch_size, score_threshold=args.score_threshold,
                                max_detections=args.max_detections)
    except (FileNotFoundError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}: {len(results)} images, {sum(len(r['scores']) for r in results)} detections",
              file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
