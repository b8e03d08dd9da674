"""Decode untrusted image bytes into the one array layout the pipeline takes.

Output everywhere: np.ndarray (h, w, 3) uint8 RGB, EXIF orientation applied, first frame of
animations and multi-page files. Every failure is an `ImageError` subclass so a caller (the
server) can map it to a client error without catching broad exceptions:

    EmptyImageError       no bytes at all
    UnsupportedImageError bytes that no decoder recognises (not an image, or a format we do not take)
    CorruptImageError     a recognised format whose data is truncated or damaged
    ImageTooLargeError    more pixels than `max_pixels` (decompression bombs), checked from the
                          header before any pixel is decoded
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:  # optional (server extra): libjpeg-turbo decoding without Pillow's copies
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - Pillow decodes everything alone
    _simplejpeg = None

__all__ = [
    "SUPPORTED_FORMATS",
    "CorruptImageError",
    "EmptyImageError",
    "ImageError",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "load_image",
    "probe_image",
    "to_rgb_array",
]

# Pillow format names accepted. Others Pillow could open (EPS runs Ghostscript, PSD, ICO...)
# are refused: a smaller decoder surface for untrusted uploads.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")

DEFAULT_MAX_PIXELS = 40_000_000

# A truncated upload must fail, not decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """Base class: the bytes are not an image we can decode."""


class EmptyImageError(ImageError):
    pass


class UnsupportedImageError(ImageError):
    pass


class CorruptImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    pass


def probe_image(data: bytes | bytearray | memoryview, *,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded: what decoding `data` will cost.
    Raises the ImageError that load_image would raise for the same header."""
    data = bytes(data)
    size = _jpeg_size(data)
    if size is not None:
        _check_size(*size, max_pixels)
        return size
    img = _open(data, max_pixels)
    with img:
        return img.size


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from libjpeg-turbo's header parse (a microsecond; Pillow's open
    costs over 30), or None for anything else, which Pillow then judges. The same SOF dimensions
    Pillow reads: a JPEG whose pixels turn out damaged fails at decode, as it would after Pillow."""
    if _simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        h, w, _, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return w, h


def _check_size(w: int, h: int, max_pixels: int | None) -> None:
    if w <= 0 or h <= 0:
        raise CorruptImageError(f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"image has {w}x{h} = {w * h} pixels, limit is {max_pixels}")


def load_image(data: bytes | bytearray | memoryview | str | os.PathLike, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, threads: int = 1,
               after: Callable[[np.ndarray, int, int], None] | None = None) -> np.ndarray:
    """Decode `data` (encoded bytes, or a path to a file) to (h, w, 3) uint8 RGB.

    Orientation from EXIF is applied, so h, w are the displayed height and width and boxes
    predicted on the result are in the pixels a viewer sees. `max_pixels=None` disables the limit.
    threads=2: a large baseline JPEG is decoded in two bands at once (runtime.jpeg_bands), for
    latency on otherwise idle cores; the pixels are the same. after(out, row0, row1): given to
    those bands (runtime.jpeg_bands.decode: each thread passes its rows of the returned array as
    soon as they are decoded, for work alongside: fast_prepare.Bands.rows); not called otherwise.
    """
    if isinstance(data, (str, os.PathLike)):
        data = Path(data).read_bytes()
    data = bytes(data)
    img = _open(data, max_pixels)
    with img:
        fast = _fast_jpeg(img, data, threads, after)
        if fast is not None:
            return fast
        try:
            img.seek(0)  # first frame of GIF / WebP animations and multi-page TIFF
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise CorruptImageError(f"cannot decode image: {e}") from None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Pillow's lazy open (header only) with every check that needs no pixel."""
    if not data:
        raise EmptyImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns above its global limit; ours is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except UnidentifiedImageError:
        raise UnsupportedImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:  # header present but damaged
        raise CorruptImageError(f"cannot read image header: {e}") from None
    try:
        if img.format not in SUPPORTED_FORMATS:
            raise UnsupportedImageError(f"unsupported image format {img.format}")
        _check_size(*img.size, max_pixels)
    except ImageError:
        img.close()
        raise
    return img


def _fast_jpeg(img: Image.Image, data: bytes, threads: int = 1,
               after: Callable[[np.ndarray, int, int], None] | None = None) -> np.ndarray | None:
    """Baseline/progressive RGB or grey JPEGs without an EXIF rotation, decoded by libjpeg-turbo
    straight into the output array (simplejpeg): one allocation instead of Pillow's three copies.
    Same library and settings as Pillow's decoder (accurate DCT, fancy upsampling), so the pixels
    are identical (tests/runtime/test_images_fast_jpeg.py checks every COCO128 photo). None means:
    take Pillow's path (other modes, rotated, simplejpeg missing, or any libjpeg warning, which
    Pillow may accept and simplejpeg's strict mode refuses). threads >= 2: first try two bands at
    once (runtime.jpeg_bands: the same pixels, checked against simplejpeg at first use), which
    steps aside the same way."""
    if _simplejpeg is None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    try:
        if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: exif_transpose would move pixels
            return None
    except Exception:  # a damaged EXIF block: Pillow's path decides what it means
        return None
    if threads >= 2 and not img.info.get("progressive"):  # (refused by the bands too, after a thread hop)
        from runtime import jpeg_bands

        arr = jpeg_bands.decode(data, *img.size, after=after)
        if arr is not None:
            return arr
    try:
        arr = _simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None
    return arr if arr.shape[:2] == (img.size[1], img.size[0]) else None


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (h, w, 3) uint8 RGB.

    16-bit and 32-bit integer greyscale (I;16*, I) and float (F) are scaled by their bit depth
    instead of clipped, which is what `Image.convert("RGB")` would do. Alpha is composited on
    white, the background a viewer sees transparent regions on.
    """
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img, dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        # "I" holds 16-bit data from PNG/TIFF in practice; fall back to the observed range above it.
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if hi > 1.0 or lo < 0.0:  # not a 0..1 image: stretch its range
            a = (a - lo) / max(hi - lo, 1e-12)
        grey = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        arr = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    elif mode == "LAB":
        from PIL import ImageCms

        srgb = ImageCms.createProfile("sRGB")
        lab = ImageCms.createProfile("LAB")
        transform = ImageCms.buildTransform(lab, srgb, "LAB", "RGB")
        arr = np.asarray(ImageCms.applyTransform(img, transform), dtype=np.uint8)
    elif mode in ("L", "1"):
        # Grey replicated into three channels, as convert("RGB") does ("1": 0 -> 0, 1 -> 255), but
        # through a third of the bytes: Pillow's 3-channel export is the slow part of a large image.
        grey = np.asarray(img if mode == "L" else img.convert("L"), dtype=np.uint8)
        arr = np.stack([grey, grey, grey], axis=-1)  # 5x faster than a broadcast copy at 40 Mpx
    else:  # P, CMYK, YCbCr, HSV, RGBX, ...
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"decoded array has shape {arr.shape}, expected (h, w, 3)")
    arr = np.ascontiguousarray(arr)
    # Pillow's buffers come back read-only; torch.from_numpy warns on those.
    return arr if arr.flags.writeable else arr.copy()


# The one list of file suffixes the project treats as images (folders for predict, verify, calibration).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(directory: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files directly in `directory` (by IMAGE_SUFFIXES, case-insensitive), sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"not a directory: {d}")
    paths = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:limit] if limit else paths
