"""One JPEG decoded by two threads: the top band of rows here, the bottom band in a helper thread.

JPEG's entropy-coded data has to be read in order, so the bottom band's thread reads the rows above
it too, but skips their IDCT, upsampling and colour conversion (libjpeg-turbo's
jpeg_skip_scanlines). On the project's 2 cores a 640x480 COCO128 photo (4:4:4, about 200 kB) took
3.6-3.7 ms whole and 2.4-2.6 ms in two bands split at 62% of its height: the bottom band's
skipping costs about as much as decoding the extra rows would. The split is for an idle server's
latency: the skipped rows are read twice, so under load (other images decoding or a model
running) the caller decodes whole.

The C part (runtime/_jpegbands.c) is an optional extension built at install against the system's
libjpeg-turbo; `available()` is False without it, and after a failed first-use check: the bands
must give simplejpeg's pixels, bit for bit, on probe images of every sampling the split takes
(4:4:4, 4:2:2, 4:2:0, grey). A JPEG the C part does not split (progressive, multi-scan, other
samplings), or any libjpeg error or warning, gives None: the caller takes its whole-image decoder,
which decides what the bytes mean, so errors are exactly those of the path without bands.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MIN_PIXELS", "SPLIT_AT", "available", "decode"]

# Below this many pixels the hand-off to the helper thread (about 0.1 ms) is most of the gain.
MIN_PIXELS = 100_000
# The top band's share of the rows: the bottom thread reads the top band's entropy data too, so an
# even split leaves it the longer job (measured on 640x480 photos: 0.5 -> 2.5-2.8 ms, 0.62 -> 2.4-2.6).
SPLIT_AT = 0.62

_OK, _NOT_SPLIT = 0, 4
_MSG_LEN = 200

_LOCK = threading.Lock()
_fn = None  # jb_decode_rows, once loaded and checked
_checked: bool | None = None
_helper: ThreadPoolExecutor | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load():
    spec = importlib.util.find_spec("runtime._jpegbands")  # the built extension's path; not imported
    if spec is None or not spec.origin:
        return None
    fn = ctypes.CDLL(spec.origin).jb_decode_rows  # ctypes releases the GIL for the call
    fn.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """The C part is built, loads, and its bands equal simplejpeg's whole decode (checked once),
    on a process allowed at least two cores."""
    global _checked, _fn, _helper
    with _LOCK:
        if _checked is None and _cores() < 2:
            _checked = False  # one core: the bands would take turns
        if _checked is None:
            try:
                fn = _load()
            except OSError as e:  # built, but its libjpeg is gone or another one
                log.warning("JPEG band decoding unavailable (%s): decoding whole", e)
                fn = None
            _checked = fn is not None and _self_check(fn)
            if _checked:
                _fn = fn
                _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg-band")
    return _checked


def _rows(fn, data: bytes, out: np.ndarray, row0: int, row1: int) -> int:
    h, w = out.shape[:2]
    return fn(data, len(data), out.ctypes.data, w, h, row0, row1, None, 0)


def _self_check(fn) -> bool:
    """Bands of Pillow-encoded probes at every sampling the split takes equal simplejpeg's decode."""
    try:
        import simplejpeg
        from PIL import Image
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 331 * 517 * 3).reshape(331, 517, 3)
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    for mode, subsampling in (("RGB", 0), ("RGB", 1), ("RGB", 2), ("L", 0)):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90, subsampling=subsampling)
        data = buf.getvalue()
        want = simplejpeg.decode_jpeg(data, colorspace="RGB")
        h = want.shape[0]
        for split in (1, 7, 8, 16, int(h * SPLIT_AT), h - 1):
            got = np.zeros_like(want)
            if _rows(fn, data, got, 0, split) != _OK or _rows(fn, data, got, split, h) != _OK:
                log.warning("JPEG band decoding failed on a probe (%s, subsampling %d): decoding whole",
                            mode, subsampling)
                return False
            if not np.array_equal(got, want):
                log.warning("JPEG bands differ from simplejpeg's decode here (%s, subsampling %d, "
                            "split at row %d): decoding whole", mode, subsampling, split)
                return False
    return True


def decode(data: bytes, width: int, height: int) -> np.ndarray | None:
    """(height, width, 3) uint8 RGB of a JPEG whose header says width x height, decoded in two bands
    on two threads; None where the caller should decode whole: the C part unavailable, the image
    small, not splittable here, or any libjpeg error or warning."""
    if width * height < MIN_PIXELS or height < 32 or not available():
        return None
    out = np.empty((height, width, 3), np.uint8)
    split = int(height * SPLIT_AT)
    try:
        bottom = _helper.submit(_rows, _fn, data, out, split, height)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        return None
    top = _rows(_fn, data, out, 0, split)
    return out if top == _OK and bottom.result() == _OK else None
