"""Parity of an exported graph with the PyTorch checkpoint it came from.

    python -m export verify --checkpoint CKPT --model model.onnx --images DIR [--annotations GT]

Both run on the same preprocessed batches; reported: max abs difference of the raw outputs (when
both kept the same RoIs), the detection match rate both ways (same label, IoU >= 0.95, score within
0.02), and with annotations each backend's COCO box AP. Fails (exit 1) when the match rate is below
99% or the APs differ by more than 0.2 points.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.ops import box_iou
from model.postprocess import Detections, postprocess
from model.transform import preprocess

MATCH_IOU = 0.95
MATCH_SCORE = 0.02
MIN_MATCH_RATE = 0.99
MAX_AP_DIFF = 0.2  # AP points (AP in percent)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def matched_fraction(a: list[Detections], b: list[Detections], *, iou: float = MATCH_IOU,
                     score_tol: float = MATCH_SCORE) -> tuple[int, int]:
    """(matched, total): detections of `a` that have a partner in `b` on the same image with the same
    label, IoU >= iou and |score difference| <= score_tol."""
    matched = total = 0
    for da, db in zip(a, b, strict=True):
        total += len(da.scores)
        if len(da.scores) == 0 or len(db.scores) == 0:
            continue
        ok = box_iou(da.boxes.float(), db.boxes.float()) >= iou  # (n_a, n_b)
        ok &= da.labels[:, None] == db.labels[None, :]
        ok &= (da.scores[:, None] - db.scores[None, :]).abs() <= score_tol
        matched += int(ok.any(1).sum())
    return matched, total


def match_rate(a: list[Detections], b: list[Detections], **kw) -> float:
    """Worse of the two directions; 1.0 when neither has any detection."""
    ma, ta = matched_fraction(a, b, **kw)
    mb, tb = matched_fraction(b, a, **kw)
    return min(ma / ta if ta else 1.0, mb / tb if tb else 1.0)


@dataclass
class VerifyReport:
    images: int
    detections_torch: int
    detections_other: int
    match_rate: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # raw output -> max |torch - other|
    same_rois_batches: int = 0  # batches where both kept the same number of RoIs
    ap_torch: float | None = None
    ap_other: float | None = None

    @property
    def ok(self) -> bool:
        if self.match_rate < MIN_MATCH_RATE:
            return False
        if self.ap_torch is not None and self.ap_other is not None:
            return abs(self.ap_torch - self.ap_other) <= MAX_AP_DIFF
        return True

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def compare_backends(net, other, cfg, images: list[torch.Tensor], *, batch_size: int = 2,
                     score_thresh: float | None = None) -> tuple[VerifyReport, list, list]:
    """Run `net` (eager) and `other` (a Backend: images, image_sizes -> RawDetections) on the same
    batches of (3, h, w) uint8 images. Returns (report, torch detections, other detections)."""
    rh = cfg.roi_heads
    post = dict(score_thresh=rh.score_thresh if score_thresh is None else score_thresh,
                nms_thresh=rh.nms_thresh, detections_per_img=rh.detections_per_img, min_size=rh.min_size)
    dets_t, dets_o, diffs, same = [], [], {}, 0
    net = net.eval()
    for s in range(0, len(images), batch_size):
        batch = preprocess(images[s:s + batch_size], cfg.transform)
        with torch.no_grad():
            raw_t = net(batch.images, batch.image_sizes)
        raw_o = other(batch.images, batch.image_sizes)
        if raw_t.scores.shape == raw_o.scores.shape and torch.equal(raw_t.batch_idx, raw_o.batch_idx):
            same += 1
            for name in ("scores", "boxes"):
                d = (getattr(raw_t, name) - getattr(raw_o, name)).abs()
                diffs[name] = max(diffs.get(name, 0.0), float(d.max()) if d.numel() else 0.0)
        dets_t += postprocess(raw_t, batch.image_sizes, batch.original_sizes, **post)
        dets_o += postprocess(raw_o, batch.image_sizes, batch.original_sizes, **post)
    report = VerifyReport(
        images=len(images), detections_torch=sum(len(d.scores) for d in dets_t),
        detections_other=sum(len(d.scores) for d in dets_o), match_rate=match_rate(dets_t, dets_o),
        max_abs_diff=diffs, same_rois_batches=same,
    )
    return report, dets_t, dets_o


def box_ap(dets: list[Detections], image_ids: list[int], gt: dict, class_names: list[str]) -> float:
    """COCO box AP (percent) of detections on images `image_ids` of the COCO json `gt`.
    Labels map to category ids by class name (falls back to the label itself)."""
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    label_to_cat = [by_name.get(n, i) for i, n in enumerate(class_names)]
    results = []
    for det, image_id in zip(dets, image_ids, strict=True):
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    ids = set(image_ids)
    sub = {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    from train.evaluate import coco_metrics  # the one COCOeval call of the project

    return 100.0 * coco_metrics(sub, results)["AP"]


def list_images(directory: str | Path, limit: int | None = None) -> list[Path]:
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:limit] if limit else paths


def load_images(paths: list[Path]) -> list[torch.Tensor]:
    from runtime.images import load_image

    return [torch.from_numpy(load_image(p)).permute(2, 0, 1).contiguous() for p in paths]


def verify(checkpoint: str | Path, model_path: str | Path, images_dir: str | Path, *,
           annotations: str | Path | None = None, batch_size: int = 2, limit: int | None = None,
           backend=None) -> VerifyReport:
    """The `verify` command: torch checkpoint vs exported model (.onnx, or a given backend)."""
    from model.checkpoint import load_checkpoint

    net, meta = load_checkpoint(checkpoint)
    if backend is None:
        backend = load_backend(model_path)
    paths = list_images(images_dir, limit)
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    report, dets_t, dets_o = compare_backends(net, backend, meta.config, load_images(paths), batch_size=batch_size)
    if annotations is not None:
        gt = json.loads(Path(annotations).read_text())
        id_of = {im["file_name"]: im["id"] for im in gt["images"]}
        keep = [i for i, p in enumerate(paths) if p.name in id_of]
        ids = [id_of[paths[i].name] for i in keep]
        report.ap_torch = box_ap([dets_t[i] for i in keep], ids, gt, meta.class_names)
        report.ap_other = box_ap([dets_o[i] for i in keep], ids, gt, meta.class_names)
    return report


def load_backend(model_path: str | Path):
    path = Path(model_path)
    if path.suffix == ".engine":
        from runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path)
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path)


def synthetic_images(sizes=((480, 640), (600, 400), (333, 517)), seed: int = 0) -> list[torch.Tensor]:
    """Smooth random uint8 images (blobs, not noise, so a trained detector sees some structure)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        low = torch.rand(1, 3, max(2, h // 40), max(2, w // 40), generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((img * 255).to(torch.uint8))
    return out


def quick_verify(net, onnx_path: str | Path, cfg, *, images: list[torch.Tensor] | None = None) -> VerifyReport:
    """Post-export smoke parity: batch 2 and 1 over three sizes (mixed-size batches pad).
    Raises AssertionError when the match rate is below MIN_MATCH_RATE."""
    backend = load_backend(onnx_path)
    report, _, _ = compare_backends(net, backend, cfg, images or synthetic_images(), batch_size=2)
    if report.match_rate < MIN_MATCH_RATE:
        raise AssertionError(f"exported graph disagrees with torch: {report.to_json()}")
    return report
