"""model.postprocess compiled (runtime._post_kernel, numba) or in numpy, for the few dozen to few
hundred candidates a served image has: the same detections to the bit, without a torch op per step.

Shape shorthand: R RoIs of the batch, C classes (0 = background), N candidates of one image (class
scores above its threshold), K kept. Boxes are xyxy in absolute pixels.

Why: on a server request the torch path is about forty small tensor ops (filter, small boxes,
class-wise NMS in tiles, rescale), and their dispatch is most of its time: 0.67-0.80 ms for the
demo model's 20-50 candidates, against about 0.1 ms in numpy (see the README's serving section).
Right after a backend call the caches are cold and each of numpy's few dozen calls costs several
times its warm price (0.7 ms in the server for 0.2 ms warm, the demo model's ~110 candidates): the
compiled kernel is one call with loops (runtime/_post_kernel.py). It is used once its first-use
check found it equal to the numpy path on crowded, tied inputs; without numba, numpy.

Why it equals model.postprocess to the bit: every value is the same float32 operation in the same
order (IoU as model.ops.nms._pair_iou: inter / ((area_a + area_b) - inter); thresholds as float32,
the NMS threshold as model.ops.nms._threshold_below gives it), NMS is the same greedy rule (visit by
decreasing score, stable for ties; drop a box whose IoU with a kept box of its class is above the
threshold) on the full (N, N) suppression matrix instead of tiles, and the outputs are gathered in
the same order. tests/runtime/test_fast_post.py compares the two on seeded inputs built to tie and
to sit on every threshold, and on a real model's outputs.

Where it does not apply, `postprocess` returns None and the caller takes model.postprocess: tensors
not float32 or not on the CPU, non-finite values, or an image with more than MAX_CANDIDATES
candidates (the (N, N) matrix and the greedy loop grow as N^2; the torch path's tiles do not).
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np
import torch

from model.ops.nms import _threshold_below
from model.postprocess import Detections, RawDetections

log = logging.getLogger(__name__)

__all__ = ["MAX_CANDIDATES", "postprocess"]

MAX_CANDIDATES = 256  # per image; past it the torch path

_NONE = (-1, np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int64))  # "not here"

_LOCK = threading.Lock()
_compiled = None  # runtime._post_kernel.postprocess_one, once checked equal to _numpy_one
_checked = False


def postprocess(raw: RawDetections, image_sizes: torch.Tensor, original_sizes: torch.Tensor, *,
                score_thresh: list[float], nms_thresh: float, detections_per_img: list[int], min_size: float,
                classes: list[torch.Tensor | None]) -> list[Detections] | None:
    """model.postprocess's result for the same arguments (per-image lists, one entry per image), or
    None where this path does not apply (see the module)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (raw.scores, raw.boxes)):
        return None
    scores = raw.scores.detach().numpy()  # (R, C)
    boxes = raw.boxes.detach().numpy()  # (R, C, 4)
    if scores.ndim != 2 or boxes.shape != (*scores.shape, 4):  # the kernel reads by these shapes, unchecked
        return None
    B = int(image_sizes.shape[0])
    C = scores.shape[1]
    thr = np.float32(_threshold_below(float(nms_thresh), torch.float32))
    batch_idx = raw.batch_idx.numpy() if B > 1 else None
    sizes = image_sizes.numpy().astype(np.float32)  # (B, 2) (h, w): exact for any image size
    originals = original_sizes.numpy().astype(np.float32)
    one = _one()
    out = []
    for i in range(B):
        if B == 1:
            s, b = np.ascontiguousarray(scores), np.ascontiguousarray(boxes)
        else:
            rows = np.flatnonzero(batch_idx == i)
            s, b = scores[rows], boxes[rows]
        h, w = originals[i] / sizes[i]  # float32 ratios, as model.transform.scale_boxes
        top_k = int(detections_per_img[i])
        n, kept_boxes, kept_scores, labels = one(
            s, b, np.float32(score_thresh[i]), _wanted(C, classes[i]), np.float32(min_size), thr, top_k,
            np.array([w, h, w, h], dtype=np.float32), MAX_CANDIDATES)
        if n < 0:  # too many candidates, or values that are not finite: the torch path decides
            return None
        out.append(Detections(torch.from_numpy(kept_boxes), torch.from_numpy(kept_scores), torch.from_numpy(labels)))
    return out


def _wanted(C: int, classes: torch.Tensor | None) -> np.ndarray:
    """(C,) bool: the label ids kept (ids outside 0..C-1 match nothing, as torch.isin)."""
    if classes is None:
        return _everything(C)
    wanted = np.zeros(C, dtype=bool)
    ids = classes.numpy()
    wanted[ids[(ids >= 0) & (ids < C)]] = True
    return wanted


@functools.lru_cache(maxsize=16)
def _everything(C: int) -> np.ndarray:
    return np.ones(C, dtype=bool)  # shared by every call, never written (numba's signature takes it writable)


def _numpy_one(scores: np.ndarray, boxes: np.ndarray, score_thresh: np.float32, wanted: np.ndarray,
               min_size: np.float32, thr: np.float32, top_k: int, scale: np.ndarray, max_candidates: int
               ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One image (scores (R, C), boxes (R, C, 4)) -> (K, boxes (K, 4) scaled, scores (K,), labels
    (K,) int64), or (-1, ...) where this path does not apply. runtime._post_kernel.postprocess_one
    computes the same, compiled."""
    C = scores.shape[1]
    s = scores[:, 1:].reshape(-1)  # (R * (C-1),) row-major: index r * (C-1) + (c-1)
    keep = np.flatnonzero(s > score_thresh)
    labels = keep % max(1, C - 1) + 1
    if not wanted.all():
        chosen = wanted[labels]
        keep, labels = keep[chosen], labels[chosen]
    if keep.size > max_candidates:
        return _NONE
    s = s[keep]
    b = boxes[:, 1:].reshape(-1, 4)[keep]  # (N, 4)
    if not (np.isfinite(s).all() and np.isfinite(b).all()):
        return _NONE  # NaN orders and compares as torch's sort may not: its path decides
    small = (b[:, 2] - b[:, 0] >= min_size) & (b[:, 3] - b[:, 1] >= min_size)
    keep = np.flatnonzero(small)
    s, b, labels = s[keep], b[keep], labels[keep]
    keep = _class_nms(b, s, labels, thr)[:top_k]
    return keep.size, b[keep] * scale, s[keep], labels[keep].astype(np.int64)


def _class_nms(b: np.ndarray, s: np.ndarray, labels: np.ndarray, thr: float) -> np.ndarray:
    """b (N, 4) float32, s (N,), labels (N,) -> (K,) int64 indices kept, by decreasing score:
    greedy NMS within each class, IoU > thr suppresses (thr: a float32 value)."""
    n = s.shape[0]
    if n == 0:
        return np.empty(0, np.int64)
    order = np.argsort(-s, kind="stable")  # decreasing, ties in index order (torch.sort stable)
    x1, y1, x2, y2 = b[order].T
    area = (x2 - x1) * (y2 - y1)
    w = np.maximum(np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :]), np.float32(0))
    h = np.maximum(np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :]), np.float32(0))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 for empty boxes: NaN, never above thr, as in torch
        iou = inter / ((area[:, None] + area[None, :]) - inter)  # (N, N)
    lab = labels[order]
    sup = (iou > np.float32(thr)) & (lab[:, None] == lab[None, :])
    dead = np.zeros(n, dtype=bool)
    kept = []
    for j in range(n):  # rows of kept boxes only; each row a vector op
        if not dead[j]:
            kept.append(j)
            dead |= sup[j]
    return order[np.asarray(kept, dtype=np.int64)]


def _one():
    """The compiled kernel where numba is installed and it equals _numpy_one here (checked once,
    on seeded crowded inputs with ties and values on the thresholds), else _numpy_one."""
    global _compiled, _checked
    if not _checked:
        with _LOCK:
            if not _checked:
                try:
                    from runtime import _post_kernel

                    kernel = _post_kernel.postprocess_one
                    if not _self_check(kernel):
                        log.warning("compiled postprocessing differs from numpy's here: using numpy's")
                        kernel = None
                except ImportError:  # numba not installed (it is in the server extra)
                    kernel = None
                except Exception as e:  # a numba that cannot compile here: numpy's path is always right
                    log.warning("compiled postprocessing unavailable (%s: %s): using numpy's", type(e).__name__, e)
                    kernel = None
                _compiled, _checked = kernel, True
    return _compiled or _numpy_one


def crowded(rng: np.random.Generator, R: int, C: int, spread: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(scores (R, C), boxes (R, C, 4)) float32 built to be hard: most boxes overlap, scores from a
    coarse grid (many ties) and on either side of 0.05, empty and tiny boxes, exact duplicates.
    The first-use check's input, and the tests'."""
    grid = np.array([0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9], np.float32)
    near = np.array([np.float32(0.05), np.nextafter(np.float32(0.05), np.float32(1)),
                     np.nextafter(np.float32(0.05), np.float32(0))], np.float32)
    scores = rng.choice(np.concatenate([grid, near, rng.random(8, dtype=np.float32)]), size=(R, C))
    xy = rng.random((R, C, 2), dtype=np.float32) * spread
    wh = rng.choice(np.array([0.0, 0.005, 1.0, 8.0, 20.0, 40.0], np.float32), size=(R, C, 2))
    wh += rng.random((R, C, 2), dtype=np.float32) * (wh > 0.5)
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    dup = rng.random((R, C)) < 0.1  # exact duplicates of the previous RoI's box
    boxes[1:][dup[1:]] = boxes[:-1][dup[1:]]
    return scores.astype(np.float32), boxes


def on_the_threshold() -> tuple[np.ndarray, np.ndarray]:
    """(scores (R, C), boxes (R, C, 4)): pairs of boxes whose IoU is 0.5 exactly or a few float32
    steps either side of it, each pair in a class of its own, so that whether a pair's second box
    is kept is the NMS threshold's decision alone (at 0.5)."""
    widths = [np.float32(5.0)]
    for _ in range(6):
        widths = [np.nextafter(widths[0], np.float32(0)), *widths, np.nextafter(widths[-1], np.float32(10))]
    C = len(widths) + 1
    boxes = np.zeros((2 * len(widths), C, 4), np.float32)
    scores = np.zeros((2 * len(widths), C), np.float32)
    for k, w in enumerate(widths):  # IoU of (0, 0, 10, 10) with (0, 0, 10, w) is w / 10
        boxes[2 * k, k + 1] = (0.0, 0.0, 10.0, 10.0)
        boxes[2 * k + 1, k + 1] = (0.0, 0.0, 10.0, w)
        scores[2 * k, k + 1], scores[2 * k + 1, k + 1] = 0.9, 0.8
    return scores, boxes


def _self_check(kernel) -> bool:
    rng = np.random.default_rng(0)
    scale = np.array([1.5, 0.75, 1.5, 0.75], np.float32)
    cases = [(*on_the_threshold(), None)]
    for _ in range(8):
        R, C = int(rng.integers(1, 60)), int(rng.integers(2, 8))
        cases.append((*crowded(rng, R, C), rng.random(C) < 0.7))
    for scores, boxes, wanted in cases:
        if wanted is None:
            wanted = np.ones(scores.shape[1], dtype=bool)
        for score_thresh, nms, top_k in ((0.05, 0.5, 100), (0.0, 0.3, 7), (0.3, 0.7, 0), (0.05, 0.5, -2)):
            args = (scores, boxes, np.float32(score_thresh), wanted, np.float32(1e-2),
                    np.float32(_threshold_below(nms, torch.float32)), top_k, scale, MAX_CANDIDATES)
            want, got = _numpy_one(*args), kernel(*args)
            if want[0] != got[0] or not all(np.array_equal(x, y) and x.dtype == y.dtype
                                            for x, y in zip(want[1:], got[1:], strict=True)):
                return False
    return True
