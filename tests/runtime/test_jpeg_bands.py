"""runtime.jpeg_bands: a JPEG decoded in two bands on two threads gives simplejpeg's pixels exactly,
steps aside wherever it would not, and turns every bad input into the whole decoder's answer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from runtime import images, jpeg_bands

simplejpeg = pytest.importorskip("simplejpeg")


@pytest.fixture(scope="module", autouse=True)
def bands():
    """The C part must have been built wherever libjpeg's headers were there to build it with
    (`make install` on this machine): a lost build fails here instead of every test skipping."""
    if not jpeg_bands.available():
        if Path("/usr/include/jpeglib.h").exists() and jpeg_bands._cores() >= 2:
            pytest.fail("runtime._jpegbands is not built or failed its check, though jpeglib.h is here")
        pytest.skip("runtime._jpegbands not built (no libjpeg headers), or one core")


def _photo(h: int = 331, w: int = 517, seed: int = 0) -> np.ndarray:
    """Smooth gradients with noise: every DCT coefficient band in use, like a photo."""
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def _rows(data: bytes, out: np.ndarray, row0: int, row1: int) -> int:
    return jpeg_bands._rows(data, out, row0, row1)


def test_every_coco128_photo_decodes_to_simplejpeg_s_pixels(coco128_all):
    paths = coco128_all
    banded = 0
    for p in paths:
        data = p.read_bytes()
        want = simplejpeg.decode_jpeg(data, colorspace="RGB")
        got = jpeg_bands.decode(data, want.shape[1], want.shape[0])
        if got is not None:
            banded += 1
            assert np.array_equal(got, want), p.name
        assert np.array_equal(images.load_image(data, threads=2), images.load_image(data)), p.name
    assert banded >= len(paths) - 2  # the bands really ran, not simplejpeg compared with itself


@pytest.mark.parametrize("mode,subsampling", [("RGB", 0), ("RGB", 1), ("RGB", 2), ("L", 0)],
                         ids=["4:4:4", "4:2:2", "4:2:0", "grey"])
@pytest.mark.parametrize("h,w", [(331, 517), (480, 640), (97, 1201)])
def test_any_split_row_of_every_sampling_equals_the_whole_decode(mode, subsampling, h, w):
    """Split rows on and off the 8- and 16-row block boundaries, the first and the last row."""
    data = _jpeg(_photo(h, w, seed=h), mode, subsampling=subsampling)
    want = simplejpeg.decode_jpeg(data, colorspace="RGB")
    for split in sorted({1, 7, 8, 9, 15, 16, 17, h // 2, int(h * jpeg_bands.SPLIT_AT), h - 8, h - 1}):
        got = np.full_like(want, 77)
        assert _rows(data, got, 0, split) == 0
        assert np.array_equal(got[:split], want[:split]) and (got[split:] == 77).all()  # its own rows only
        assert _rows(data, got, split, h) == 0
        assert np.array_equal(got, want), split


def test_the_rest_goes_to_whichever_thread_claims_it_first():
    """jb_decode_top / jb_decode_bottom: the bottom rows are decoded once, by the thread that gets
    to them first; the other writes none of them."""
    import ctypes

    data = _jpeg(_photo(480, 640))
    want = simplejpeg.decode_jpeg(data, colorspace="RGB")
    split = int(480 * jpeg_bands.SPLIT_AT)

    def call(fn, out, claim):
        return fn(data, len(data), out.ctypes.data, 640, 480, split, ctypes.byref(claim), None, 0)

    # the helper never ran (busy cores): the top's thread decodes on to the end by itself
    out, claim = np.zeros_like(want), ctypes.c_int(0)
    assert call(jpeg_bands._top, out, claim) == 0 and claim.value == 1
    assert np.array_equal(out, want)
    before = out.copy()  # ... and a helper that runs afterwards writes nothing
    assert call(jpeg_bands._bottom, out, claim) == jpeg_bands._NOT_CLAIMED and np.array_equal(out, before)
    # the helper got there first: it decodes the bottom rows, the top's thread only its own
    out, claim = np.full_like(want, 77), ctypes.c_int(0)
    assert call(jpeg_bands._bottom, out, claim) == 0 and claim.value == 2
    assert np.array_equal(out[split:], want[split:]) and (out[:split] == 77).all()
    assert call(jpeg_bands._top, out, claim) == 0 and claim.value == 2
    assert np.array_equal(out, want)


def test_restart_markers_and_odd_quality_tables_decode_the_same():
    for save in ({"quality": 100}, {"quality": 40}, {"quality": 90, "optimize": True}):
        data = _jpeg(_photo(), **save)
        want = simplejpeg.decode_jpeg(data, colorspace="RGB")
        assert np.array_equal(jpeg_bands.decode(data, 517, 331), want), save
    data = _jpeg(_photo(), restart_marker_rows=2)  # Pillow >= 11.1 writes DRI/RSTn
    want = simplejpeg.decode_jpeg(data, colorspace="RGB")
    assert np.array_equal(jpeg_bands.decode(data, 517, 331), want)


def test_what_the_bands_do_not_split_is_left_to_the_whole_decoder():
    pixels = _photo()
    progressive = _jpeg(pixels, progressive=True)
    out = np.empty((331, 517, 3), np.uint8)
    assert _rows(progressive, out, 0, 100) == jpeg_bands._NOT_SPLIT  # multi-scan: no split
    assert _rows(progressive, out, 0, 331) == 0  # whole is fine
    assert np.array_equal(out, simplejpeg.decode_jpeg(progressive, colorspace="RGB"))
    assert jpeg_bands.decode(_jpeg(_photo(64, 64)), 64, 64) is None  # too small to be worth a thread
    cmyk = _jpeg(pixels, "CMYK")
    assert _rows(cmyk, out, 0, 100) == jpeg_bands._NOT_SPLIT  # four components
    for data in (progressive, cmyk):
        assert np.array_equal(images.load_image(data, threads=2), images.load_image(data))


def test_a_header_that_disagrees_with_the_caller_is_refused_before_any_pixel():
    data = _jpeg(_photo())
    out = np.empty((331, 517, 3), np.uint8)
    assert jpeg_bands._fn(data, len(data), out.ctypes.data, 516, 331, 0, 331, None, 0) == 3
    assert jpeg_bands._fn(data, len(data), out.ctypes.data, 517, 331, 200, 100, None, 0) == 3
    assert jpeg_bands._fn(data, len(data), out.ctypes.data, 517, 331, 0, 332, None, 0) == 3


def test_errors_and_warnings_come_back_as_codes_with_libjpeg_s_message():
    import ctypes

    data = _jpeg(_photo())
    out = np.empty((331, 517, 3), np.uint8)
    msg = ctypes.create_string_buffer(200)
    assert jpeg_bands._fn(b"\xff\xd8\xff\xd9", 4, out.ctypes.data, 517, 331, 0, 331, msg, 200) == 1
    assert msg.value  # libjpeg's own words, e.g. "Empty JPEG image"
    truncated = data[: len(data) * 2 // 3]
    assert jpeg_bands._fn(truncated, len(truncated), out.ctypes.data, 517, 331, 200, 331, msg, 200) == 2
    assert b"end" in msg.value.lower() or b"corrupt" in msg.value.lower(), msg.value
    assert jpeg_bands.decode(truncated, 517, 331) is None
    with pytest.raises(images.CorruptImageError):
        images.load_image(truncated, threads=2)


def test_damaged_photos_get_the_whole_decoder_s_answer():
    """Bytes flipped anywhere (markers, tables, entropy-coded data) or the file cut short: whatever
    the whole decode makes of them (its pixels, or an error), the two-band path gives the same, and
    never crashes the process."""
    data = _jpeg(_photo(480, 640))
    rng = np.random.default_rng(3)
    outcomes = set()
    for k in range(80):
        bad = bytearray(data)
        if k % 4 == 3:
            bad = bad[: int(rng.integers(2, len(bad)))]
        else:
            for i in rng.integers(0, len(bad) if k % 2 else 700, size=int(rng.integers(1, 4))):
                bad[i] = int(rng.integers(0, 256))
        bad = bytes(bad)
        try:
            want = images.load_image(bad)
        except images.ImageError as e:
            with pytest.raises(type(e)):
                images.load_image(bad, threads=2)
            outcomes.add("error")
        else:
            assert np.array_equal(images.load_image(bad, threads=2), want)
            outcomes.add("pixels")
    assert outcomes == {"error", "pixels"}  # both kinds of damage were exercised


def test_after_gets_each_band_from_the_thread_that_decoded_it(monkeypatch):
    """decode(..., after=f): f(out, row0, row1) once per band, from the thread that decoded those
    rows, with them already in `out`; all calls are over when decode returns. Both ways the rows
    can be shared: the helper takes the bottom rows (made to claim them first), or it is busy and
    this thread decodes on by itself (one call for every row)."""
    import ctypes
    import threading
    import time

    data = _jpeg(_photo(480, 640))
    want = simplejpeg.decode_jpeg(data, colorspace="RGB")
    split = int(480 * jpeg_bands.SPLIT_AT)
    calls = []

    def after(out, row0, row1):
        assert np.array_equal(out[row0:row1], want[row0:row1])  # the rows are in when passed
        calls.append((threading.get_ident(), row0, row1))

    real_top = jpeg_bands._top

    def top_after_the_helper_claims(*args):
        claim = ctypes.cast(args[6], ctypes.POINTER(ctypes.c_int)).contents
        deadline = time.monotonic() + 10
        while claim.value != 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        return real_top(*args)
    top_after_the_helper_claims.__name__ = "jb_decode_top"
    monkeypatch.setattr(jpeg_bands, "_top", top_after_the_helper_claims)
    out = jpeg_bands.decode(data, 640, 480, after=after)
    assert out is not None and np.array_equal(out, want)
    me = threading.get_ident()
    (top_thread, *top_rows), (bottom_thread, *bottom_rows) = sorted(calls, key=lambda c: c[1])
    assert (top_thread, top_rows) == (me, [0, split]) and bottom_rows == [split, 480]
    assert bottom_thread != me  # the bottom band's call came from the helper that decoded it

    monkeypatch.setattr(jpeg_bands, "_top", real_top)
    calls.clear()
    busy = threading.Event()
    jpeg_bands._helper.submit(busy.wait, 10)  # the helper cannot start the bottom band in time
    try:
        out = jpeg_bands.decode(data, 640, 480, after=after)
    finally:
        busy.set()
    assert out is not None and np.array_equal(out, want) and calls == [(me, 0, 480)]


def test_prepared_alongside_the_bands_equals_prepared_after(coco128_all):
    """Pipeline.prepare(image, bands) after load_image(..., after=bands.rows): the same tensor as
    preparing the decoded image, on every COCO128 photo, with each photo's rows split between the
    threads as they happened to be."""
    from model.config import ModelConfig
    from runtime.pipeline import Pipeline

    pipe = Pipeline(backend=None, config=ModelConfig(), class_names=["bg"], model_name="t")
    finished = 0
    for p in coco128_all:
        data = p.read_bytes()
        want = pipe.prepare(images.load_image(data))
        bands = pipe.bands()
        image = images.load_image(data, threads=2, after=bands.rows)
        finished += bands.finish(image) is not None
        got = pipe.prepare(image, bands)
        assert (got.image_size, got.original_size) == (want.image_size, want.original_size)
        assert torch_equal(got.tensor, want.tensor), p.name
    assert finished >= len(coco128_all) * 0.9  # (progressive photos are decoded whole, not in bands)


def torch_equal(a, b) -> bool:
    return bool(np.array_equal(a.numpy(), b.numpy()))
