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
torch's route, and so this pass, is the same at every intra-op thread count: model.transform.resize
sends each channel through as a one-channel image, since a three-channel one takes another route at
one thread (a server on --threads 1 once fell back to torch's path because the check failed there).
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
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MIN_PIXELS", "Bands", "available", "prepare_padded", "taps"]

MIN_PIXELS = 16384  # h' * w' below this: torch's path (4x the largest output seen to differ)

_LOCK = threading.Lock()
_kernel = None  # runtime._prepare_kernel, once available() found it equal to torch's
_checked: bool | None = None  # None: not yet checked; then whether the kernel equals torch's
_threads = 1


@functools.lru_cache(maxsize=512)
def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of torch's CPU kernel (align_corners=False) along one axis: source indices
    i0, i1 (n_out,) int64 and weights w0, w1 (n_out,) float32, out[j] = w0[j] x[i0[j]] + w1[j] x[i1[j]]."""
    if n_in == n_out:  # torch copies
        i = np.arange(n_out, dtype=np.int64)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    # (shared by every caller through the cache: read, never written)
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
        _kernel.numba.set_num_threads(_threads)  # per calling thread in numba
        _kernel.resize_normalize(img, _lut(mean, std), *taps(h, size[0]), *taps(w, size[1]), out, _threads)
    return out


def _torch_twin(img: np.ndarray, size: tuple[int, int], padded: tuple[int, int], mean: tuple[float, ...],
                std: tuple[float, ...]) -> np.ndarray:
    """The same output from model.transform's torch path (what the pipeline runs otherwise)."""
    import torch

    from model.transform import normalize, resize

    y = resize(normalize(torch.from_numpy(img).permute(2, 0, 1), mean, std), size)
    out = torch.zeros((3, *padded))
    out[:, :size[0], :size[1]] = y
    return out.numpy()


def available() -> bool:
    """numba is installed and its kernel equals torch's on the probe images (checked once)."""
    global _checked, _kernel, _threads
    with _LOCK:
        if _checked is None:
            try:
                from runtime import _prepare_kernel as kernel
            except ImportError:  # numba not installed (it is in the server extra)
                _checked = False
                return False
            except Exception as e:  # a numba that cannot compile here: torch's path is always right
                log.warning("fast preprocessing unavailable (%s: %s): using torch's", type(e).__name__, e)
                _checked = False
                return False
            _kernel = kernel
            # beyond a few threads the pass is bound by memory and waking threads costs more than it saves
            _threads = min(4, kernel.numba.config.NUMBA_NUM_THREADS)
    if _checked is None:
        ok = _self_check()
        with _LOCK:
            _checked = ok
    return bool(_checked)


def _in_bands(img: np.ndarray, size: tuple[int, int], padded: tuple[int, int], mean: tuple[float, ...],
              std: tuple[float, ...], split: int) -> np.ndarray | None:
    """Bands' output for `img` decoded as rows [split, h) and then [0, split) (the bottom may come first)."""
    bands = Bands(lambda h, w: (size, padded), mean, std)
    bands.rows(img, split, img.shape[0])
    bands.rows(img, 0, split)
    return bands.finish(img)


def _self_check() -> bool:
    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    probes = (((480, 640), (600, 800)), ((1200, 1601), (600, 800)), ((600, 800), (600, 800)),
              ((37, 53), (600, 859)), ((1, 5000), (1, 16384)), ((3000, 7), (2731, 6)), ((100, 100), (128, 128)))
    try:
        for (h, w), size in probes:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            padded = (size[0] + 7, size[1] + 3)
            want = _torch_twin(img, size, padded, mean, std)
            if not np.array_equal(_run(img, size, padded, mean, std), want) or not all(
                    np.array_equal(_in_bands(img, size, padded, mean, std, split), want) for split in (1, h // 2, h - 1)):
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
    if not (img.flags.c_contiguous and img.flags.writeable):  # the one signature compiled: C, writable
        img = np.array(img, order="C")
    return _run(img, size, padded, tuple(mean), tuple(std))


class Bands:
    """prepare_padded's output, computed alongside a decode in bands (runtime.jpeg_bands): each
    decoding thread, once its rows of the image are in, prepares the output rows that read only
    those rows (`rows`, no GIL held while the kernel runs); `finish` prepares what is left, the few
    rows that read both bands, and the padding. The same kernel per output row, so the same bits as
    prepare_padded (_self_check compares them too).

        bands = Bands(plan, mean, std)        # plan(h, w) -> (size (h', w'), padded (H, W))
        jpeg_bands.decode(data, w, h, after=bands.rows)   # rows(img, row0, row1), from either thread
        out = bands.finish(img)   # (3, H, W), or None: prepare `img` the usual way

    `finish` returns None unless every `rows` call was on `img` itself (the array the bands were
    decoded into): an image the caller decoded some other way after the bands gave up is prepared
    from scratch, never from rows of an abandoned decode. Also None where prepare_padded would be
    (an output under MIN_PIXELS)."""

    def __init__(self, plan: Callable[[int, int], tuple[tuple[int, int], tuple[int, int]]],
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self._plan = plan
        self._lut = _lut(tuple(mean), tuple(std))
        self.size: tuple[int, int] | None = None  # (h', w'), from the first rows call
        self._taps: tuple[np.ndarray, ...] = ()  # row taps, then column taps
        self._out: np.ndarray | None = None
        self._img: np.ndarray | None = None
        self._done: list[tuple[int, int]] = []  # output row ranges written
        self._broken = False
        self._lock = threading.Lock()

    def rows(self, img: np.ndarray, row0: int, row1: int) -> None:
        """Rows [row0, row1) of `img` (h, w, 3) uint8 are decoded: write the output rows that read
        no other. Any failure leaves the work to `finish` (this runs in a decoding thread)."""
        try:
            with self._lock:
                if self._img is None and not self._broken:
                    if _kernel is None:  # Bands are made where available() is true; never worse than torch's
                        self._broken = True
                        return
                    h, w = img.shape[:2]
                    size, padded = self._plan(h, w)
                    if size[0] * size[1] < MIN_PIXELS:  # torch's path (see MIN_PIXELS)
                        self._broken = True
                        return
                    self.size = size
                    self._taps = (*taps(h, size[0]), *taps(w, size[1]))
                    self._out = np.empty((3, *padded), np.float32)
                    self._img = img
                if self._broken or img is not self._img:
                    self._broken = True
                    return
            r0, r1 = self._taps[0], self._taps[1]
            # row y reads r0[y] <= r1[y], both non-decreasing in y: the rows inside [row0, row1) are a range
            y0 = int(np.searchsorted(r0, row0, "left"))
            y1 = int(np.searchsorted(r1, row1, "left"))
            if y0 < y1:
                _kernel.resize_rows(img, self._lut, *self._taps, self._out, y0, y1)
                with self._lock:
                    self._done.append((y0, y1))
        except Exception:  # noqa: BLE001 - finish prepares from scratch
            log.exception("preprocessing alongside the decode failed: preparing after it")
            with self._lock:
                self._broken = True

    def finish(self, img: np.ndarray) -> np.ndarray | None:
        """(3, H, W) float32, prepare_padded(img, size, padded, mean, std); None when `img` is not
        the array the rows were prepared from (or a `rows` call failed)."""
        with self._lock:
            if self._broken or self._img is None or img is not self._img:
                return None
            done = sorted(self._done)
        y, end = 0, self._out.shape[1]
        for a, b in [*done, (end, end)]:
            if y < a:
                _kernel.resize_rows(img, self._lut, *self._taps, self._out, y, a)
            y = max(y, b)
        return self._out
