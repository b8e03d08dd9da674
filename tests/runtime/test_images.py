"""runtime.images.load_image: formats, modes, EXIF orientation and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.images import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    load_image,
)

COCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128" / "train2017"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _quadrants(w: int = 40, h: int = 30) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation is visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(a)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    img = _quadrants()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(_encode(img, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, np.asarray(img))


def test_jpeg_close_to_source():
    out = load_image(_encode(_quadrants(), "JPEG", quality=95))
    assert out.shape == (30, 40, 3)
    assert abs(int(out[5, 5, 0]) - 255) < 8 and out[5, 5, 1] < 8  # red corner stays red


def test_gif_takes_first_frame():
    frames = [Image.new("P", (16, 8), i) for i in (1, 2)]
    for f, colour in zip(frames, ((255, 0, 0), (0, 0, 255)), strict=True):
        f.putpalette([0, 0, 0, *colour, *colour] + [0] * (256 * 3 - 9))
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(data)
    assert out.shape == (8, 16, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_multipage_tiff_takes_first_page():
    pages = [Image.new("RGB", (10, 6), (0, 200, 0)), Image.new("RGB", (10, 6), (9, 9, 9))]
    out = load_image(_encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert tuple(out[3, 3]) == (0, 200, 0)


def test_grey_palette_and_cmyk_become_rgb():
    grey = Image.new("L", (5, 4), 77)
    assert tuple(load_image(_encode(grey, "PNG"))[0, 0]) == (77, 77, 77)
    pal = _quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(load_image(_encode(pal, "PNG")), np.asarray(_quadrants()))
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_encode(cmyk, "JPEG", quality=100))
    assert out[3, 3, 0] > 240 and out[3, 3, 1] < 15 and out[3, 3, 2] < 15


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_encode(rgba, "PNG"))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_16_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    out = load_image(_encode(img, "PNG"))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_applied():
    img = _quadrants(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 30, 3)  # displayed size: height and width swapped
    # After a 90 degree clockwise turn the blue (bottom-left) quadrant sits top-left.
    tl = out[5, 5].astype(int)
    assert tl[2] > 200 and tl[0] < 40 and tl[1] < 40


def test_real_coco_photo():
    path = next(iter(sorted(COCO.glob("*.jpg"))), None)
    if path is None:
        pytest.skip(f"no COCO128 photos under {COCO}")
    out = load_image(path)
    with Image.open(path) as im:
        w, h = im.size
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_empty():
    with pytest.raises(EmptyImageError):
        load_image(b"")


@pytest.mark.parametrize("data", [b"hello, not an image", b"%PDF-1.4\n" + b"0" * 100, bytes(range(256))])
def test_not_an_image(data):
    with pytest.raises(UnsupportedImageError):
        load_image(data)


def test_unsupported_format_refused():
    with pytest.raises(UnsupportedImageError, match="unsupported"):
        load_image(_encode(Image.new("RGB", (4, 4)), "ICO"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated(fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    with pytest.raises(CorruptImageError):
        load_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixel data: what a decompression bomb looks like
    before it is decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)  # the first few bytes of a huge all-black image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(_png_header_only(10_000, 5_000), max_pixels=40_000_000)
    # far beyond Pillow's own bomb threshold as well
    with pytest.raises(ImageTooLargeError):
        load_image(_png_header_only(60_000, 60_000), max_pixels=40_000_000)


def test_pixel_limit_boundary():
    data = _encode(Image.new("RGB", (10, 10)), "PNG")
    assert load_image(data, max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_pixels=99)
