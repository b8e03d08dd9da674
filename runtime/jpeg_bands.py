"""One JPEG decoded by two threads: the top rows here, the bottom rows in a helper thread.

JPEG's entropy-coded data has to be read in order, so the helper reads the rows above its band too,
but skips their IDCT, upsampling and colour conversion (libjpeg-turbo's jpeg_skip_scanlines), and
the band boundary sits below the middle (SPLIT_AT) so that both threads finish together. On the
project's 2 cores a 640x480 COCO128 photo (4:4:4, about 200 kB) took 3.6-3.9 ms whole and
3.1-3.4 ms in two bands, one after another in one process; in the server, alternating request by
request, 3.8 -> 3.1 ms (torch backend) and 4.1 -> 3.4 ms (onnxruntime). The split is for an idle
server's latency: the skipped rows are read twice, so under load the server decodes whole
(server/batcher.py, MicroBatcher.alone).

Whoever reaches the bottom rows first decodes them (runtime/_jpegbands.c, a claim both threads
race for): when the helper is not scheduled in time because the cores are busy, this thread finds
them unclaimed after its own rows and decodes on by itself, from where it is, as if decoding whole.

The C part is an optional extension built at install against the system's libjpeg-turbo (setup.py);
`available()` is False without it, and after a failed first-use check: the bands must give
simplejpeg's pixels, bit for bit, on probe images of every sampling the split takes (4:4:4, 4:2:2,
4:2:0, grey), whichever thread takes the bottom rows. A JPEG the C part does not split
(progressive, multi-scan, other samplings), or any libjpeg error or warning, gives None: the caller
takes its whole-image decoder, which decides what the bytes mean, so errors are exactly those of
the path without bands.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MIN_PIXELS", "SPLIT_AT", "available", "decode"]

# Below this many pixels the hand-off to the helper thread (about 0.1 ms) is most of the gain.
MIN_PIXELS = 100_000
# The top band's share of the rows: the helper reads the top band's entropy data too, so an even
# split leaves it the longer job (16 640x480 photos, two runs: split at 0.5 2.5-3.0 ms, at 0.62 2.4-2.9).
SPLIT_AT = 0.62

_OK, _NOT_SPLIT, _NOT_CLAIMED = 0, 4, 5

_LOCK = threading.Lock()
_fn = None  # jb_decode_rows, once loaded and checked
_top = _bottom = None  # jb_decode_top, jb_decode_bottom
_checked: bool | None = None
_helper: ThreadPoolExecutor | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load():
    """(jb_decode_rows, jb_decode_top, jb_decode_bottom) of the built extension, or None."""
    spec = importlib.util.find_spec("runtime._jpegbands")  # the built extension's path; not imported
    if spec is None or not spec.origin:
        return None
    lib = ctypes.CDLL(spec.origin)  # ctypes releases the GIL for each call
    fns = lib.jb_decode_rows, lib.jb_decode_top, lib.jb_decode_bottom
    for fn, band in zip(fns, (ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)), strict=True):
        # data, size, out, width, height, then (row0, row1) or (split, claim), msg, msg_len
        fn.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, band, ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fns


def available() -> bool:
    """The C part is built, loads, and its bands equal simplejpeg's whole decode (checked once),
    on a process allowed at least two cores."""
    global _checked, _fn, _top, _bottom, _helper
    with _LOCK:
        if _checked is None and _cores() < 2:
            _checked = False  # one core: the bands would take turns
        if _checked is None:
            try:
                fns = _load()
            except (OSError, AttributeError) as e:  # built, but its libjpeg is gone, or an old build
                log.warning("JPEG band decoding unavailable (%s): decoding whole", e)
                fns = None
            if fns is not None:
                _fn, _top, _bottom = fns
                _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg-band")
            _checked = fns is not None and _self_check()
    return _checked


def _rows(data: bytes, out: np.ndarray, row0: int, row1: int) -> int:
    """Rows [row0, row1) of `data` into the same rows of `out` (h, w, 3), on this thread."""
    h, w = out.shape[:2]
    return _fn(data, len(data), out.ctypes.data, w, h, row0, row1, None, 0)


def _self_check() -> bool:
    """On Pillow-encoded probes at every sampling the split takes, both ways the rows can be shared
    between the two threads give simplejpeg's decode: any split row decoded as two bands, and
    decode()'s pair of calls with either thread taking the bottom rows."""
    try:
        import simplejpeg
        from PIL import Image
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 133 * 211 * 3).reshape(133, 211, 3)  # odd sizes: partial blocks
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    for mode, subsampling in (("RGB", 0), ("RGB", 1), ("RGB", 2), ("L", 0)):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90, subsampling=subsampling)
        data = buf.getvalue()
        want = simplejpeg.decode_jpeg(data, colorspace="RGB")
        h, w = want.shape[:2]
        outs = []
        for split in (1, 7, 8, 16, int(h * SPLIT_AT), h - 1):
            got = np.zeros_like(want)
            outs.append((split, got, _rows(data, got, 0, split) == _rows(data, got, split, h) == _OK))
        for first in (_top, _bottom):  # alone, the top's thread decodes on; first, the bottom's claims
            got, claim = np.zeros_like(want), ctypes.c_int(0)
            args = (data, len(data), got.ctypes.data, w, h, int(h * SPLIT_AT), ctypes.byref(claim), None, 0)
            ok = first(*args) == _OK and (first is _top or _top(*args) == _OK)
            outs.append((first.__name__, got, ok))
        for how, got, ok in outs:
            if not ok or not np.array_equal(got, want):
                log.warning("JPEG bands %s simplejpeg's decode here (%s, subsampling %d, %s): decoding whole",
                            "differ from" if ok else "failed on a probe that decodes with", mode, subsampling, how)
                return False
    return True


def decode(data: bytes, width: int, height: int, split_at: float = SPLIT_AT,
           after: Callable[[np.ndarray, int, int], None] | None = None) -> np.ndarray | None:
    """(height, width, 3) uint8 RGB of a JPEG whose header says width x height, decoded by two
    threads; None where the caller should decode whole: the C part unavailable, the image small,
    not splittable here, or any libjpeg error or warning.

    This thread decodes the rows above `split_at` of the height, the helper thread skips to there
    and decodes the rest. When the helper is not scheduled in time (busy cores) this thread finds
    the rest unclaimed and decodes on by itself, as if decoding whole (runtime/_jpegbands.c).

    after(out, row0, row1): called by the thread that decoded rows [row0, row1) of `out` as soon as
    they are in (fast_prepare.Bands.rows: preprocessing them there); every call has returned when
    this returns. Rows of a decode that then fails may have been passed: `out` is not returned."""
    if width * height < MIN_PIXELS or height < 32 or not available():
        return None
    out = np.empty((height, width, 3), np.uint8)
    split = min(max(int(height * split_at), 1), height - 1)
    claim = ctypes.c_int(0)  # kept alive with `data` by the helper's call until it returns
    args = (data, len(data), out.ctypes.data, width, height, split, ctypes.byref(claim), None, 0)

    def bottom_band() -> int:
        code = _bottom(*args)
        if code == _OK and after is not None:
            after(out, split, height)
        return code

    try:
        bottom = _helper.submit(bottom_band)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        return None
    top = _top(*args)
    if claim.value == 1:  # the rest was decoded here; the helper writes no row of `out`
        if top == _OK and after is not None:
            after(out, 0, height)
        return out if top == _OK else None
    if top == _OK and after is not None:
        after(out, 0, split)
    done = bottom.result()  # it may be writing into `out`: wait before letting go of it
    return out if top == _OK and done == _OK else None
