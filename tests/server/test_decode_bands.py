"""The server decodes a photo in two bands only when it is alone and decode_bands is on, and gets
the same pixels either way (runtime.jpeg_bands does the decoding; tests/runtime/test_jpeg_bands.py)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import jpeg_bands
from server.engine import Engine, Job


class _Identity:
    class_names = ["__background__", "a"]

    def prepare(self, image):
        return image


@pytest.fixture
def banded(monkeypatch):
    """Counts the two-band decodes that returned pixels (the real decoder runs)."""
    if not jpeg_bands.available():
        pytest.skip("runtime._jpegbands not built here (tests/runtime/test_jpeg_bands.py says why)")
    calls = []
    real = jpeg_bands.decode

    def counting(*args, **kw):
        out = real(*args, **kw)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(jpeg_bands, "decode", counting)
    return calls


@pytest.mark.parametrize(("decode_bands", "alone", "bands"), [(True, True, True), (True, False, False),
                                                               (False, True, False), (False, False, False)])
def test_two_bands_only_for_a_lone_image_with_the_setting_on(banded, coco128_images, decode_bands, alone, bands):
    engine = Engine(_Identity(), max_pixels=10**8, decode_bands=decode_bands)
    job = Job("p.jpg", coco128_images[0].read_bytes(), 0.5, 10)  # 640x480
    got = engine.prepare(job, alone=alone)
    assert banded == ([True] if bands else [])
    want = Engine(_Identity(), max_pixels=10**8).prepare(job)
    assert np.array_equal(got.item, want.item) and (got.width, got.height) == (640, 480)


def test_a_lone_photo_is_preprocessed_alongside_its_bands(banded, coco128_images, monkeypatch):
    """With a real pipeline, the decoding threads also preprocess their rows (fast_prepare.Bands):
    the prepared tensor is the one the image gets decoded whole and prepared after."""
    from model.config import ModelConfig
    from runtime import fast_prepare
    from runtime.pipeline import Pipeline

    assert fast_prepare.available()  # its first-use check (which runs Bands too) before counting
    finished = []
    real_finish = fast_prepare.Bands.finish

    def finish(self, img):
        out = real_finish(self, img)
        finished.append(out is not None)
        return out
    monkeypatch.setattr(fast_prepare.Bands, "finish", finish)
    pipe = Pipeline(backend=None, config=ModelConfig(), class_names=["__background__", "a"], model_name="t")
    engine = Engine(pipe, max_pixels=10**8, decode_bands=True)
    for path in coco128_images:
        job = Job(path.name, path.read_bytes(), 0.5, 10)
        got, want = engine.prepare(job, alone=True), engine.prepare(job, alone=False)
        assert got.item.image_size == want.item.image_size
        assert np.array_equal(got.item.tensor.numpy(), want.item.tensor.numpy()), path.name
    assert finished == [True] * len(coco128_images) and all(banded)


def test_a_photo_the_bands_leave_alone_is_prepared_as_usual(banded, coco128_images):
    """A rotated (EXIF), progressive or grey JPEG, prepared alone: whatever the bands did or did not
    take, the tensor and size are those of the path without them."""
    import io

    from PIL import Image

    from model.config import ModelConfig
    from runtime.pipeline import Pipeline

    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees
    bodies = []
    with Image.open(coco128_images[0]) as photo:  # 640x480
        for mode, save in (("RGB", {"exif": exif.tobytes()}), ("RGB", {"progressive": True}), ("L", {})):
            buf = io.BytesIO()
            photo.convert(mode).save(buf, "JPEG", quality=90, **save)
            bodies.append(buf.getvalue())
    pipe = Pipeline(backend=None, config=ModelConfig(), class_names=["__background__", "a"], model_name="t")
    engine = Engine(pipe, max_pixels=10**8, decode_bands=True)
    for n, data in enumerate(bodies):
        job = Job(f"{n}.jpg", data, 0.5, 10)
        got, want = engine.prepare(job, alone=True), engine.prepare(job, alone=False)
        assert (got.width, got.height) == (want.width, want.height) and got.item.image_size == want.item.image_size
        assert np.array_equal(got.item.tensor.numpy(), want.item.tensor.numpy()), n
        if n == 0:
            assert (got.width, got.height) == (480, 640)  # turned as EXIF says
    assert banded == [True]  # the grey one went through the bands; the rotated and progressive did not
