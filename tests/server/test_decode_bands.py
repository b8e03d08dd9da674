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
