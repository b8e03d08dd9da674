"""The numba kernel of runtime.fast_prepare (imported by it on first use only: numba's import and
compile stay off every path that never prepares an array). See fast_prepare for what it computes
and why it equals torch's preprocessing to the bit.

Shape shorthand: h, w the decoded image; h', w' its resized size; H, W the padded size.
"""

from __future__ import annotations

import numba  # noqa: F401 - fast_prepare sets the thread count through this module's numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from runtime._jit import compile_for


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma), as torch's vectorized CPU kernels compute it."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen

_u8_3d = types.Array(types.uint8, 3, "C")
_f32_1d, _f32_2d, _f32_3d = (types.Array(types.float32, n, "C") for n in (1, 2, 3))
_i64_1d = types.Array(types.int64, 1, "C")

@compile_for(types.void(_u8_3d, _f32_2d, types.int64, _i64_1d, _i64_1d, _f32_1d, _f32_1d, _f32_2d, _f32_2d))
def _width_pass(img, lut, y, c0, c1, l0, l1, row, dst):  # pragma: no cover - compiled
    """dst (3, w') = source row y normalized (row: (3, w) scratch) and interpolated along the width.
    Upscaling reads each source pixel more than once: normalize the row once, then interpolate.
    Downscaling by more than 2 leaves source pixels unread: normalize just the two taps of each
    output (the same table values either way), the three channels of a pixel together."""
    w = img.shape[1]
    ow = c0.shape[0]
    if 2 * ow < w:
        for x in range(ow):  # a tap of weight 0 (l0 is then exactly 1) is read only where a is 0
            p = c0[x]
            q = c1[x]
            wp = l0[x]
            wq = l1[x]
            for c in range(3):
                a = lut[c, img[y, p, c]]
                if wq != 0.0 or a == 0.0:
                    a = _fma(a, wp, lut[c, img[y, q, c]] * wq)
                dst[c, x] = a
        return
    for x in range(w):
        for c in range(3):
            row[c, x] = lut[c, img[y, x, c]]
    for c in range(3):
        for x in range(ow):
            dst[c, x] = _fma(row[c, c0[x]], l0[x], row[c, c1[x]] * l1[x])

_ROWS_SIG = types.void(_u8_3d, _f32_2d, _i64_1d, _i64_1d, _f32_1d, _f32_1d, _i64_1d, _i64_1d, _f32_1d, _f32_1d,
                       _f32_3d, types.int64, types.int64)


@compile_for(_ROWS_SIG)
def resize_rows(img, lut, r0, r1, m0, m1, c0, c1, l0, l1, out, y0, y1):  # pragma: no cover - compiled
    """Output rows [y0, y1) of out (3, H, W) float32: rows under h' the image's, normalized and
    interpolated (row y reads source rows r0[y] and r1[y] only), the rest zeros; the columns past
    w' zeros. img (h, w, 3) uint8, lut (3, 256) float32, row taps r0, r1 (h',) with weights m0,
    m1, column taps c0, c1 (w',) with weights l0, l1. Each source row a row uses is interpolated
    along the width once (two kept in `rows`, slot k holding source row ids[k]; the taps only move
    down), so a downscale skips the rows between. One thread; two threads may fill disjoint rows
    of one `out` at once (no GIL held)."""
    w = img.shape[1]
    ow = c0.shape[0]
    oh = r0.shape[0]
    row = np.empty((3, w), np.float32)
    rows = np.empty((2, 3, ow), np.float32)
    ids = np.full(2, -1, np.int64)
    for y in range(y0, y1):
        if y >= oh:
            out[:, y, :] = 0.0
            continue
        a = r0[y]
        b = r1[y]
        wa = m0[y]
        wb = m1[y]
        if ids[0] != a and ids[1] != a:  # row a into the slot that does not hold b
            k = 0 if ids[0] != b else 1
            _width_pass(img, lut, a, c0, c1, l0, l1, row, rows[k])
            ids[k] = a
        ka = 0 if ids[0] == a else 1
        if wb == 0.0 and a != b:  # row b's weight is 0 and wa exactly 1: fma(t, 1, u * 0) is t...
            for c in range(3):
                out[c, y, :ow] = rows[ka, c]
                out[c, y, ow:] = 0.0
                for x in range(ow):
                    if out[c, y, x] == 0.0:  # ...unless t is 0: the sign of u * 0 decides, so read row b
                        if ids[1 - ka] != b:
                            _width_pass(img, lut, b, c0, c1, l0, l1, row, rows[1 - ka])
                            ids[1 - ka] = b
                        out[c, y, x] = _fma(out[c, y, x], wa, rows[1 - ka, c, x] * wb)
            continue
        if ids[0] != b and ids[1] != b:  # row b into the slot that does not hold a
            k = 0 if ids[0] != a else 1
            _width_pass(img, lut, b, c0, c1, l0, l1, row, rows[k])
            ids[k] = b
        kb = 0 if ids[0] == b else 1
        for c in range(3):
            for x in range(ow):
                out[c, y, x] = _fma(rows[ka, c, x], wa, rows[kb, c, x] * wb)
            out[c, y, ow:] = 0.0


@compile_for(types.void(_u8_3d, _f32_2d, _i64_1d, _i64_1d, _f32_1d, _f32_1d, _i64_1d, _i64_1d, _f32_1d,
                     _f32_1d, _f32_3d, types.int64), parallel=True)
def resize_normalize(img, lut, r0, r1, m0, m1, c0, c1, l0, l1, out, blocks):  # pragma: no cover - compiled
    """out (3, H, W) float32 written whole (resize_rows over every row): one parallel region of
    `blocks` bands of output rows."""
    H = out.shape[1]
    for band in prange(blocks):
        resize_rows(img, lut, r0, r1, m0, m1, c0, c1, l0, l1, out, band * H // blocks, (band + 1) * H // blocks)
