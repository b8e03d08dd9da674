"""The simplejpeg fast path of load_image gives Pillow's pixels exactly, and steps aside where it would not."""

from __future__ import annotations

import io

import numpy as np
import pytest

from runtime import images


@pytest.fixture
def pillow_only(monkeypatch):
    def load(data: bytes) -> np.ndarray:
        with monkeypatch.context() as m:
            m.setattr(images, "_simplejpeg", None)
            return images.load_image(data)
    return load


def test_every_coco128_photo_decodes_to_pillow_s_pixels(pillow_only, coco128_all):
    pytest.importorskip("simplejpeg")
    paths = coco128_all
    fast = 0
    for p in paths:
        data = p.read_bytes()
        got, want = images.load_image(data), pillow_only(data)
        assert got.shape == want.shape and got.dtype == np.uint8, p.name
        assert np.array_equal(got, want), p.name
        assert got.flags.writeable and got.flags.c_contiguous
        fast += images._fast_jpeg(images._open(data, None), data) is not None
    assert fast >= len(paths) - 2  # the fast path really ran (not a comparison of Pillow with itself)


def _jpeg(mode: str, exif_orientation: int | None = None) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=85, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,orientation,fast", [("RGB", None, True), ("L", None, True), ("RGB", 1, True),
                                                    ("RGB", 6, False), ("CMYK", None, False)])
def test_fast_path_only_where_it_is_exact(pillow_only, mode, orientation, fast):
    pytest.importorskip("simplejpeg")
    data = _jpeg(mode, orientation)
    assert (images._fast_jpeg(images._open(data, None), data) is not None) is fast
    got, want = images.load_image(data), pillow_only(data)
    assert np.array_equal(got, want)
    if orientation == 6:
        assert got.shape[:2] == (64, 48)  # rotated by exif_transpose on Pillow's path


def test_truncated_jpeg_is_still_refused():
    data = _jpeg("RGB")
    with pytest.raises(images.CorruptImageError):
        images.load_image(data[: len(data) // 2])


def test_grey_and_one_bit_images_replicate_like_convert_rgb():
    from PIL import Image

    rng = np.random.default_rng(0)
    for mode in ("L", "1"):
        im = Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), "L").convert(mode)
        got, want = images.to_rgb_array(im), np.asarray(im.convert("RGB"))
        assert got.shape == want.shape and np.array_equal(got, want), mode


def test_probe_reads_the_size_without_decoding():
    data = _jpeg("RGB")
    assert images.probe_image(data) == (64, 48)
    with pytest.raises(images.ImageTooLargeError):
        images.probe_image(data, max_pixels=64 * 48 - 1)
    with pytest.raises(images.EmptyImageError):
        images.probe_image(b"")
    with pytest.raises(images.UnsupportedImageError):
        images.probe_image(b"not an image at all")
