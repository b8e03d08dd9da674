"""One compiled pass for the server's preprocessing: (h, w, 3) uint8 -> (3, H, W) float32 normalized,
bilinearly resized and zero-padded, bit-equal to model.transform.normalize_resize + pad_batch.

Shape shorthand: h, w the decoded image; h', w' its resized size; H, W the padded size (multiples
of size_divisible). The twin in pure torch is model.transform (normalize, then F.interpolate
bilinear, align_corners=False); tests compare the two on real photos and edge sizes.

Why it equals torch to the bit:
- normalize: ((v / 255) - mean) / std in float32 has 256 values per channel: a lookup table built
  with the same float32 operations.
- resize: torch's CPU kernel computes each output as fma(t0, wh0, t1 * wh1), where
  t = fma(x0, ww0, x1 * ww1) interpolates along the width, and each source coordinate as
  fma(scale, dst + 0.5, -0.5) in float32. The kernel does the same with LLVM's fma: along the
  width once per source row, then along the height.
For outputs under 64 x 64 pixels torch takes another route whose roundings differ (measured: every
mismatch in 700 random size pairs had h' w' < 3822, none of 400 at or above 4096); those stay on
torch's path (MIN_PIXELS). Whether this torch build computes the rest as above is checked at first
use on probe images (upscale, downscale, identity, strips, odd sizes); on any difference, or without
numba, `prepare_padded` returns None and callers keep torch's path. So the answers never depend on
which path ran.

Why it is faster (640x480 -> 800x600 on the 2 project cores): torch's path makes a planar copy,
four float passes, the interpolation (1.4-1.5 ms with 2 threads) and the padding copy (0.2 ms);
this is one pass of 0.7 ms with 2 threads, written straight into the padded buffer.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)

try:  # optional (server extra); torch's path serves without it
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

__all__ = ["MIN_PIXELS", "available", "prepare_padded", "taps"]

MIN_PIXELS = 16384  # h' * w' below this: torch's path (4x the largest output seen to differ)

if numba is not None:
    # The workqueue layer has no spinning threads to steal cores from the backend and needs no
    # libgomp/TBB on the host; it must not be entered by two threads at once, hence _LOCK.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (llvm.fma), as torch's vectorized CPU kernels compute it."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    @njit(nogil=True, inline="always")
    def _width_pass(img, lut, y, c0, c1, l0, l1, row, dst):  # pragma: no cover - compiled
        """dst (3, w') = source row y normalized (row: (3, w) scratch) and interpolated along the width."""
        w = img.shape[1]
        for x in range(w):
            for c in range(3):
                row[c, x] = lut[c, img[y, x, c]]
        for c in range(3):
            rc = row[c]
            for x in range(c0.shape[0]):
                dst[c, x] = _fma(rc[c0[x]], l0[x], rc[c1[x]] * l1[x])

    @njit(parallel=True, nogil=True, cache=False)
    def _resize_normalize(img, lut, r0, r1, m0, m1, c0, c1, l0, l1, out, blocks):  # pragma: no cover - compiled
        """img (h, w, 3) uint8, lut (3, 256) float32, row taps r0, r1 (h',) with weights m0, m1,
        column taps c0, c1 (w',) with weights l0, l1; out (3, H, W) float32 written whole: the
        image in [:, :h', :w'], zeros elsewhere. One parallel region of `blocks` bands of output
        rows; each band interpolates along the width only the source rows its rows use (two
        cached, as the taps only move down), so a downscale skips the rows between."""
        w = img.shape[1]
        ow = c0.shape[0]
        oh = r0.shape[0]
        H, W = out.shape[1], out.shape[2]
        for band in prange(blocks):
            y0 = band * H // blocks
            y1 = (band + 1) * H // blocks
            row = np.empty((3, w), np.float32)
            rows = np.empty((2, 3, ow), np.float32)
            ids = np.full(2, -1, np.int64)
            for y in range(y0, y1):
                if y >= oh:
                    for c in range(3):
                        for x in range(W):
                            out[c, y, x] = 0.0
                    continue
                a = r0[y]
                b = r1[y]
                for need in (a, b):
                    if ids[0] != need and ids[1] != need:
                        k = 0 if ids[1] == a or ids[1] == b else 1  # keep the other needed row
                        if ids[k] == a or ids[k] == b:
                            k = 1 - k
                        _width_pass(img, lut, need, c0, c1, l0, l1, row, rows[k])
                        ids[k] = need
                ka = 0 if ids[0] == a else 1
                kb = 0 if ids[0] == b else 1
                wa = m0[y]
                wb = m1[y]
                for c in range(3):
                    ta = rows[ka, c]
                    tb = rows[kb, c]
                    for x in range(ow):
                        out[c, y, x] = _fma(ta[x], wa, tb[x] * wb)
                    for x in range(ow, W):
                        out[c, y, x] = 0.0

_LOCK = threading.Lock()
# beyond a few threads the pass is bound by memory and waking threads costs more than it saves
_THREADS = min(4, numba.config.NUMBA_NUM_THREADS) if numba is not None else 1
_checked: bool | None = None  # None: not yet checked; then whether the kernel equals torch's


@functools.lru_cache(maxsize=512)
def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of torch's CPU kernel (align_corners=False) along one axis: source indices
    i0, i1 (n_out,) int64 and weights w0, w1 (n_out,) float32, out[j] = w0[j] x[i0[j]] + w1[j] x[i1[j]]."""
    if n_in == n_out:  # torch copies
        i = np.arange(n_out, dtype=np.int64)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    # fma(scale, dst, -0.5) in float32: the float64 product of two float32 values is exact and so
    # is the subtraction at these magnitudes, so one rounding to float32 gives the fma's result
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w0 = np.float32(1) - w1
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


@functools.lru_cache(maxsize=8)
def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ((v / 255) - mean[c]) / std[c] with torch's float32 operations."""
    v = np.arange(256, dtype=np.float32) / np.float32(255)
    return ((v[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
            ).astype(np.float32)


def _run(img: np.ndarray, size: tuple[int, int], padded: tuple[int, int], mean: tuple[float, ...],
         std: tuple[float, ...]) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.empty((3, *padded), np.float32)
    with _LOCK:
        numba.set_num_threads(_THREADS)  # per calling thread in numba
        _resize_normalize(img, _lut(mean, std), *taps(h, size[0]), *taps(w, size[1]), out, _THREADS)
    return out


def _torch_twin(img: np.ndarray, size: tuple[int, int], padded: tuple[int, int], mean: tuple[float, ...],
                std: tuple[float, ...]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(img).permute(2, 0, 1).contiguous().float().div_(255)
    x = x.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])
    y = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    out = torch.zeros((3, *padded))
    out[:, :size[0], :size[1]] = y
    return out.numpy()


def available() -> bool:
    """numba is installed and its kernel equals torch's on the probe images (checked once)."""
    global _checked
    if _checked is None:
        _checked = numba is not None and _self_check()
    return _checked


def _self_check() -> bool:
    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    probes = (((480, 640), (600, 800)), ((1200, 1601), (600, 800)), ((600, 800), (600, 800)),
              ((37, 53), (600, 859)), ((1, 5000), (1, 16384)), ((3000, 7), (2731, 6)), ((100, 100), (128, 128)))
    try:
        for (h, w), size in probes:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            padded = (size[0] + 7, size[1] + 3)
            if not np.array_equal(_run(img, size, padded, mean, std), _torch_twin(img, size, padded, mean, std)):
                log.info("fast preprocessing differs from torch's at %s -> %s: using torch's", (h, w), size)
                return False
    except Exception as e:  # a numba that cannot compile here: torch's path is always right
        log.warning("fast preprocessing unavailable (%s: %s): using torch's", type(e).__name__, e)
        return False
    return True


def prepare_padded(img: np.ndarray, size: tuple[int, int], padded: tuple[int, int],
                   mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray | None:
    """img (h, w, 3) uint8 -> (3, H, W) float32, the image resized to `size` (h', w') in the top
    left, normalized with mean/std (per channel, of 0..1 values), zeros elsewhere; None when the
    kernel is unavailable or does not equal torch's here, or the output is under MIN_PIXELS."""
    if size[0] * size[1] < MIN_PIXELS or not available():
        return None
    return _run(np.ascontiguousarray(img), size, padded, tuple(mean), tuple(std))
