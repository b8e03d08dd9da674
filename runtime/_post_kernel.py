"""The numba kernel of runtime.fast_post (imported by it on first use only). See fast_post for what
it computes and why it equals model.postprocess to the bit: the same float32 operations in the same
order, here as loops in one compiled call instead of a few dozen numpy calls. A server request runs
it right after the backend, whose run has left the caches cold, where every numpy call costs
several times its warm price.

Shape shorthand: R RoIs of one image, C classes (0 = background), N candidates, K kept.
"""

from __future__ import annotations

import numpy as np
from numba import types

from runtime._jit import compile_for

_f32_1d, _f32_2d, _f32_3d = (types.Array(types.float32, n, "C") for n in (1, 2, 3))
_b_1d = types.Array(types.boolean, 1, "C")
_i64_1d = types.Array(types.int64, 1, "C")

TOO_MANY, NOT_FINITE = -1, -2  # status codes: fast_post's conditions for the torch path


@compile_for(types.Tuple((types.int64, _f32_2d, _f32_1d, _i64_1d))(
    _f32_2d, _f32_3d, types.float32, _b_1d, types.float32, types.float32, types.int64, _f32_1d, types.int64),
    error_model="numpy")  # 0 / 0 is NaN (an empty box's IoU), as in numpy and torch, not an exception
def postprocess_one(scores, boxes, score_thresh, wanted, min_size, thr, top_k, scale, max_candidates):  # pragma: no cover - compiled
    """One image's detections from scores (R, C) and class boxes (R, C, 4): candidates are the
    (RoI, class >= 1) pairs in row-major order with score > score_thresh and wanted[class]; then
    boxes narrower or lower than min_size go; greedy NMS per class (visit by decreasing score, ties
    in candidate order; IoU > thr suppresses); kept[:top_k], boxes times scale (4,).
    Returns (K, boxes (K, 4), scores (K,), labels (K,)), or (TOO_MANY | NOT_FINITE, empty...)
    where the candidates are more than max_candidates or any of their values is not finite."""
    R, C = scores.shape
    cand = np.empty(R * max(C - 1, 0), np.int64)  # r * C + c
    n = 0
    for r in range(R):
        for c in range(1, C):
            if scores[r, c] > score_thresh and wanted[c]:
                cand[n] = r * C + c
                n += 1
    if n > max_candidates:
        return TOO_MANY, np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int64)
    s = np.empty(n, np.float32)
    b = np.empty((n, 4), np.float32)
    lab = np.empty(n, np.int64)
    m = 0
    for j in range(n):
        r, c = cand[j] // C, cand[j] % C
        v = scores[r, c]
        x1, y1, x2, y2 = boxes[r, c, 0], boxes[r, c, 1], boxes[r, c, 2], boxes[r, c, 3]
        if not (np.isfinite(v) and np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)):
            return NOT_FINITE, np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int64)
        if x2 - x1 >= min_size and y2 - y1 >= min_size:
            s[m] = v
            b[m, 0], b[m, 1], b[m, 2], b[m, 3] = x1, y1, x2, y2
            lab[m] = c
            m += 1
    # decreasing score, ties in candidate order: a stable insertion sort (m <= max_candidates)
    order = np.empty(m, np.int64)
    for j in range(m):
        k = j
        while k > 0 and s[order[k - 1]] < s[j]:
            order[k] = order[k - 1]
            k -= 1
        order[k] = j
    area = np.empty(m, np.float32)
    for j in range(m):
        area[j] = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
    zero = np.float32(0)
    dead = np.zeros(m, np.bool_)
    kept = np.empty(m, np.int64)
    k_n = 0
    for a in range(m):
        i = order[a]
        if dead[a]:
            continue
        kept[k_n] = i
        k_n += 1
        for q in range(a + 1, m):
            k = order[q]
            if dead[q] or lab[k] != lab[i]:
                continue
            w = min(b[i, 2], b[k, 2]) - max(b[i, 0], b[k, 0])
            h = min(b[i, 3], b[k, 3]) - max(b[i, 1], b[k, 1])
            inter = max(w, zero) * max(h, zero)
            if inter / ((area[i] + area[k]) - inter) > thr:
                dead[q] = True
    k_n = min(k_n, top_k) if top_k >= 0 else max(k_n + top_k, 0)  # [:top_k], as numpy and torch slice
    out_b = np.empty((k_n, 4), np.float32)
    out_s = np.empty(k_n, np.float32)
    out_l = np.empty(k_n, np.int64)
    for j in range(k_n):
        i = kept[j]
        for t in range(4):
            out_b[j, t] = b[i, t] * scale[t]
        out_s[j] = s[i]
        out_l[j] = lab[i]
    return k_n, out_b, out_s, out_l
