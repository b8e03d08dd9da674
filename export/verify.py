"""The export gate: parity of an exported graph with the PyTorch checkpoint it came from.

    python -m export verify --checkpoint CKPT --model model.onnx --images DIR [--annotations GT]

Both run through runtime.Pipeline on the same preprocessed batches (images batched only with images
of the same padded size, as everywhere). Reported: max abs difference of the raw outputs (where both
kept the same RoIs), the detection match rate both ways and, with annotations, each side's COCO box AP.

Two detections match when they have the same label, IoU >= 0.95 and scores within 0.02. Ties must not
fail the gate: a model with tied scores (untrained, weakly trained, saturated) may keep either of two
equal candidates, so a detection without a partner is excused when the other side shows the tie it
lost (see `_excused`). The gate fails (GateFailed, exit 1) when the tie-aware match rate is below 99%
or the APs differ by more than 0.2 points. Those are the fp32 gate; fp16 and int8 graphs (the graph's
"precision" metadata) have their own, looser ones (GATES).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.ops import box_iou
from model.postprocess import Detections
from runtime.coco import box_ap
from runtime.images import list_images, load_image

__all__ = ["GateFailed", "MatchRule", "compare", "list_images", "load_images", "match_rate", "matched_fraction",
           "quick_verify", "synthetic_images", "verify"]
from runtime.pipeline import Pipeline, PostOptions, same_size_batches

MATCH_IOU = 0.95
MATCH_SCORE = 0.02
MIN_MATCH_RATE = 0.99
MAX_AP_DIFF = 0.2  # AP points (AP in percent)


@dataclass(frozen=True)
class PrecisionGate:
    """What a graph of one precision must meet against its fp32 checkpoint."""

    iou: float  # a match: same label, IoU >= iou ...
    score_tol: float  # ... and |score difference| <= score_tol
    min_match_rate: float
    max_ap_diff: float  # box AP points, with --annotations
    hint: str  # what to try when it fails


# fp32: the graph computes what the checkpoint does. fp16 and int8: rounding moves boxes and scores
# a little and reorders near-equal candidates, so a match is looser; measured on the shapes-trained
# tiny detector, the tiny random detector of the tests and R50-FPN stand-in weights (README, "Precision").
GATES = {
    "fp32": PrecisionGate(MATCH_IOU, MATCH_SCORE, MIN_MATCH_RATE, MAX_AP_DIFF,
                          "an op lowering or the export itself is wrong; report it with the images"),
    "fp16": PrecisionGate(0.9, 0.05, 0.95, 0.5,
                          "fp16 overflows or underflows somewhere; export fp32, or int8"),
    # int8's match rate is a "not broken" check (a miscalibrated graph matches next to nothing); the
    # stand-in R50's random heads give many near-equal scores that rounding reorders (71% measured),
    # so with annotations the AP gate (1.0 point) is the one that measures quality
    "int8": PrecisionGate(0.7, 0.1, 0.6, 1.0,
                          "calibrate on more (and more representative) images with --calib-images/--calib-count, "
                          "or try --calib-method entropy|percentile; fp16 or fp32 lose less"),
}


def gate_for(precision: str) -> PrecisionGate:
    if precision not in GATES:
        raise ValueError(f"no gate for precision {precision!r} (known: {sorted(GATES)})")
    return GATES[precision]


class GateFailed(RuntimeError):
    """An exported graph disagrees with its checkpoint; the message says by how much and what next."""

    def __init__(self, message: str, report: VerifyReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class MatchRule:
    iou: float = MATCH_IOU
    score_tol: float = MATCH_SCORE
    nms_iou: float = 0.5  # the postprocess NMS threshold: what counts as "suppressed by a tie"
    score_threshold: float = 0.05  # the postprocess score cut: scores at it are ties with it
    max_detections: int = 100  # the top-k cut: scores at the last kept one are ties with it


def _excused(d_box, d_score, d_label, other: Detections, rule: MatchRule) -> bool:
    """A detection of one side with no partner on the other is a tie, not a difference, when
    its score is at the score cut; or the other side is full (top-k) and its score is at the other's
    last one; or the other side kept an overlapping box (IoU > nms_iou: NMS chose between them) of
    the same label and the same score."""
    if d_score <= rule.score_threshold + rule.score_tol:
        return True
    n = len(other.scores)
    if n == 0:
        return False
    if n >= rule.max_detections and d_score <= float(other.scores.min()) + rule.score_tol:
        return True
    same = (other.labels == d_label) & ((other.scores - d_score).abs() <= rule.score_tol)
    if not same.any():
        return False
    return bool((box_iou(d_box[None].float(), other.boxes[same].float()) > rule.nms_iou).any())


def matched_fraction(a: list[Detections], b: list[Detections], rule: MatchRule | None = None, *,
                     tie_aware: bool = True) -> tuple[int, int]:
    """(matched, total): detections of `a` with a partner in `b` on the same image (same label,
    IoU >= rule.iou, |score difference| <= rule.score_tol), counting ties as matched when tie_aware."""
    rule = rule or MatchRule()
    matched = total = 0
    for da, db in zip(a, b, strict=True):
        total += len(da.scores)
        if len(da.scores) == 0:
            continue
        if len(db.scores):
            ok = box_iou(da.boxes.float(), db.boxes.float()) >= rule.iou  # (n_a, n_b)
            ok &= da.labels[:, None] == db.labels[None, :]
            ok &= (da.scores[:, None].float() - db.scores[None, :].float()).abs() <= rule.score_tol
            hit = ok.any(1)
        else:
            hit = torch.zeros(len(da.scores), dtype=torch.bool)
        if tie_aware:
            for j in torch.nonzero(~hit).flatten().tolist():
                hit[j] = _excused(da.boxes[j], float(da.scores[j]), int(da.labels[j]), db, rule)
        matched += int(hit.sum())
    return matched, total


def match_rate(a: list[Detections], b: list[Detections], rule: MatchRule | None = None, *,
               tie_aware: bool = True) -> float:
    """Worse of the two directions; 1.0 when neither has any detection."""
    ma, ta = matched_fraction(a, b, rule, tie_aware=tie_aware)
    mb, tb = matched_fraction(b, a, rule, tie_aware=tie_aware)
    return min(ma / ta if ta else 1.0, mb / tb if tb else 1.0)


@dataclass
class VerifyReport:
    images: int
    detections_torch: int
    detections_other: int
    match_rate: float  # tie-aware: what the gate uses
    strict_match_rate: float  # ties counted as differences (for information)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # raw output -> max |torch - other|
    same_rois_batches: int = 0  # batches where both kept the same RoIs
    ap_torch: float | None = None
    ap_other: float | None = None
    min_match_rate: float = MIN_MATCH_RATE
    max_ap_diff: float = MAX_AP_DIFF
    precision: str = "fp32"  # the exported graph's; its gate sets the thresholds above

    def apply_gate(self, gate: PrecisionGate, precision: str) -> None:
        self.min_match_rate, self.max_ap_diff, self.precision = gate.min_match_rate, gate.max_ap_diff, precision

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        out = []
        if self.match_rate < self.min_match_rate:
            out.append(f"only {100 * self.match_rate:.1f}% of detections match (gate: >= "
                       f"{100 * self.min_match_rate:.1f}%; {self.detections_torch} from the checkpoint, "
                       f"{self.detections_other} from the graph, on {self.images} images)")
        if self.ap_torch is not None and self.ap_other is not None and \
                abs(self.ap_torch - self.ap_other) > self.max_ap_diff:
            out.append(f"box AP {self.ap_other:.2f} vs the checkpoint's {self.ap_torch:.2f} "
                       f"(gate: within {self.max_ap_diff} points)")
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def compare(reference: Pipeline, other: Pipeline, images: list, *, batch_size: int = 2,
            same_size: bool = True, options: PostOptions | None = None,
            rule: MatchRule | None = None) -> tuple[VerifyReport, list[Detections], list[Detections]]:
    """Run two pipelines on the same preprocessed batches of images ((h, w, 3) uint8 arrays or (3, h, w)
    tensors). same_size=False batches images of different sizes together (padded), to check that a
    graph is right on padded batches too. Returns (report, reference detections, other detections)."""
    options = options or reference.options()
    rule = rule or MatchRule(nms_iou=reference.config.roi_heads.nms_thresh,
                             score_threshold=options.score_threshold, max_detections=options.max_detections)
    prepared = [reference.prepare(im) for im in images]
    if same_size:
        groups = same_size_batches([reference.padded_size(p) for p in prepared], batch_size)
    else:
        groups = [list(range(s, min(s + batch_size, len(images)))) for s in range(0, len(images), batch_size)]
    dets_r: list[Detections | None] = [None] * len(images)
    dets_o: list[Detections | None] = [None] * len(images)
    diffs: dict[str, float] = {}
    same = 0
    for idx in groups:
        batch = reference.collate([prepared[i] for i in idx])
        raw_r, raw_o = _image_major(reference.infer(batch)), _image_major(other.infer(batch))
        if raw_r.scores.shape == raw_o.scores.shape and torch.equal(raw_r.batch_idx, raw_o.batch_idx):
            same += 1
            for name in ("scores", "boxes"):
                d = (getattr(raw_r, name).float() - getattr(raw_o, name).float()).abs()
                diffs[name] = max(diffs.get(name, 0.0), float(d.max()) if d.numel() else 0.0)
        for i, dr, do in zip(idx, reference.postprocess(raw_r, batch, options),
                             other.postprocess(raw_o, batch, options), strict=True):
            dets_r[i], dets_o[i] = dr, do
    report = VerifyReport(
        images=len(images), detections_torch=sum(len(d.scores) for d in dets_r),
        detections_other=sum(len(d.scores) for d in dets_o), match_rate=match_rate(dets_r, dets_o, rule),
        strict_match_rate=match_rate(dets_r, dets_o, rule, tie_aware=False), max_abs_diff=diffs,
        same_rois_batches=same,
    )
    return report, dets_r, dets_o  # type: ignore[return-value]


def _image_major(raw):
    """RoI rows stably sorted by image. Within an image every runtime keeps the same RoIs in the same
    (score) order, across images not: eager NMS runs over the whole batch in score order, the
    exported graph's image by image (images on NonMaxSuppression's batch dimension)."""
    order = torch.sort(raw.batch_idx, stable=True).indices
    return type(raw)(raw.batch_idx[order], raw.scores[order], raw.boxes[order])


def failure_message(report: VerifyReport, model_path: str | Path, what: str = "exported graph") -> str:
    """One paragraph: which artifact, the numbers, what to try next."""
    problems = "; ".join(report.problems())
    gate = GATES.get(report.precision)
    hint = f" What to try: {gate.hint}." if gate is not None else ""
    return (f"{what} {model_path} ({report.precision}) failed its {report.precision} gate against the "
            f"checkpoint: {problems}.{hint} "
            f"Strict (ties counted) match rate {100 * report.strict_match_rate:.1f}%, raw max |diff| "
            f"{ {k: round(v, 6) for k, v in report.max_abs_diff.items()} }. Check on real images with "
            f"`python -m export verify --checkpoint CKPT --model {model_path} --images DIR [--annotations GT]`; "
            f"`--no-verify` on `export onnx` skips this gate (the graph is then unverified).")


def load_images(paths: list[Path]) -> list[torch.Tensor]:
    """Image files -> (3, h, w) uint8 tensors (EXIF applied, RGB)."""
    return [torch.from_numpy(load_image(p)).permute(2, 0, 1).contiguous() for p in paths]


def verify(checkpoint: str | Path, model_path: str | Path, images_dir: str | Path, *,
           annotations: str | Path | None = None, batch_size: int = 2, limit: int | None = None,
           other: Pipeline | None = None) -> VerifyReport:
    """The `verify` command: the checkpoint (torch) vs an exported model (any backend runtime loads)."""
    reference = Pipeline.load(checkpoint, backend="torch")
    other = other or Pipeline.load(model_path)
    paths = list_images(images_dir, limit)
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    gate = gate_for(other.precision)
    report, dets_r, dets_o = compare(reference, other, load_images(paths), batch_size=batch_size,
                                     rule=_rule(reference, gate))
    report.apply_gate(gate, other.precision)
    if annotations is not None:
        gt = json.loads(Path(annotations).read_text())
        id_of = {im["file_name"]: im["id"] for im in gt["images"]}
        keep = [i for i, p in enumerate(paths) if p.name in id_of]
        ids = [id_of[paths[i].name] for i in keep]
        report.ap_torch = box_ap([dets_r[i] for i in keep], ids, gt, reference.class_names)
        report.ap_other = box_ap([dets_o[i] for i in keep], ids, gt, reference.class_names)
    return report


def _rule(reference: Pipeline, gate: PrecisionGate, options: PostOptions | None = None) -> MatchRule:
    options = options or reference.options()
    return MatchRule(iou=gate.iou, score_tol=gate.score_tol, nms_iou=reference.config.roi_heads.nms_thresh,
                     score_threshold=options.score_threshold, max_detections=options.max_detections)


def synthetic_images(sizes=((480, 640), (600, 400), (333, 517)), seed: int = 0) -> list[torch.Tensor]:
    """Smooth random (3, h, w) uint8 images (blobs, not noise, so a trained detector sees some structure)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        low = torch.rand(1, 3, max(2, h // 40), max(2, w // 40), generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((img * 255).to(torch.uint8))
    return out


def quick_verify(reference: Pipeline, model_path: str | Path, *, images: list | None = None,
                 other: Pipeline | None = None, real_images: list | None = None) -> VerifyReport:
    """Post-export smoke parity over three sizes, one repeated (a batch of 2 at equal size) and one
    padded mixed-size batch (the graph must be right there too), plus `real_images` (photos held out
    from int8 calibration), with the gate of the graph's precision. Raises GateFailed."""
    other = other or Pipeline.load(model_path)
    gate = gate_for(other.precision)
    rule = _rule(reference, gate)
    images = images or synthetic_images(((480, 640), (480, 640), (600, 400), (333, 517)))
    report, _, _ = compare(reference, other, [*images, *(real_images or [])], batch_size=2, rule=rule)
    mixed, _, _ = compare(reference, other, images[1:], batch_size=3, same_size=False, rule=rule)
    report.apply_gate(gate, other.precision)
    report.match_rate = min(report.match_rate, mixed.match_rate)
    report.strict_match_rate = min(report.strict_match_rate, mixed.strict_match_rate)
    for k, v in mixed.max_abs_diff.items():
        report.max_abs_diff[k] = max(report.max_abs_diff.get(k, 0.0), v)
    if not report.ok:
        raise GateFailed(failure_message(report, model_path), report)
    return report
