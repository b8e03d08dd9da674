"""runtime.fast_prepare (one compiled pass) against its torch twin, model.transform, to the bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import TransformConfig
from model.transform import normalize, normalize_resize, pad_batch, resize, resized_size
from runtime import fast_prepare
from runtime.images import load_image
from runtime.pipeline import padded_size


def _torch_padded(img: np.ndarray, cfg: TransformConfig) -> torch.Tensor:
    x = normalize_resize(torch.from_numpy(img).permute(2, 0, 1), cfg)
    return pad_batch([x], cfg.size_divisible, cfg.pad_past_edge)[0][0]


def _fast(img: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    size = resized_size(img.shape[0], img.shape[1], cfg.min_size, cfg.max_size)
    out = fast_prepare.prepare_padded(img, size, padded_size(size, cfg.size_divisible, cfg.pad_past_edge),
                                      cfg.image_mean, cfg.image_std)
    assert out is not None
    return out


def test_kernel_is_available_here():
    """make install brings numba, and this torch build computes bilinear as the kernel does: if
    either stops being true the server silently falls back to torch's slower path, so say so."""
    import numba  # noqa: F401 - the server extra's

    assert fast_prepare.available()


def test_equals_torch_on_real_photos(shared_data):
    paths = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:24]
    assert len(paths) == 24
    sizes = set()
    for p in paths:
        img = load_image(p.read_bytes())
        sizes.add(img.shape[:2])
        for cfg in (TransformConfig(), TransformConfig(min_size=320, max_size=512, pad_past_edge=True)):
            np.testing.assert_array_equal(_fast(img, cfg), _torch_padded(img, cfg).numpy(), err_msg=str(p))
    assert len(sizes) > 3  # several aspect ratios and sizes, not one


@pytest.mark.parametrize("hw", [(100, 5000), (5000, 100), (3000, 2000), (601, 999), (600, 1000), (37, 53),
                                (1999, 3001), (800, 600)])
def test_equals_torch_on_edge_sizes(hw):
    """Strips, identity sizes (600 x 1000 is not resized), strong down- and upscaling, odd sizes."""
    img = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    cfg = TransformConfig(image_mean=(0.5, 0.25, 0.125), image_std=(0.3, 0.2, 0.1))
    np.testing.assert_array_equal(_fast(img, cfg), _torch_padded(img, cfg).numpy())


def test_noncontiguous_input_and_padding_zero():
    base = np.random.default_rng(3).integers(0, 256, (500, 700, 3), dtype=np.uint8)
    img = base[::-1, ::2]  # a strided view: copied to C order first
    cfg = TransformConfig()
    out = _fast(img, cfg)
    np.testing.assert_array_equal(out, _torch_padded(np.ascontiguousarray(img), cfg).numpy())
    h, w = resized_size(*img.shape[:2], cfg.min_size, cfg.max_size)
    assert out.shape[1] > h and not out[:, h:].any() and not out[:, :, w:].any()


def test_taps_match_interpolate_on_a_ramp():
    """Each output is w0 x[i0] + w1 x[i1]: on x = index, the taps give torch's coordinates."""
    for n_in, n_out in ((480, 600), (1600, 800), (7, 3)):
        x = torch.arange(n_in, dtype=torch.float32)[None, None, None]
        ref = torch.nn.functional.interpolate(x, size=(1, n_out), mode="bilinear", align_corners=False)[0, 0, 0]
        i0, i1, w0, w1 = fast_prepare.taps(n_in, n_out)
        got = w0 * i0.astype(np.float32) + w1 * i1.astype(np.float32)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-4)


def test_small_outputs_stay_on_torch():
    """Under MIN_PIXELS torch rounds differently (see the module): no compiled answer there, and the
    pipeline's prepare gives torch's values."""
    from model.config import ModelConfig
    from runtime.pipeline import Pipeline

    img = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert fast_prepare.prepare_padded(img, (40, 60), (64, 64), (0.5,) * 3, (0.2,) * 3) is None
    cfg = ModelConfig(transform=TransformConfig(min_size=40, max_size=80))
    pipe = Pipeline(backend=None, config=cfg, class_names=["bg"], model_name="t")
    p = pipe.prepare(img)
    np.testing.assert_array_equal(pipe.collate([p]).images[0].numpy(), _torch_padded(img, cfg.transform).numpy())


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torch_resize_is_the_same_at_one_thread(shared_data):
    """torch's own (1, 3, h, w) bilinear rounds differently at one intra-op thread (about half the
    pixels); model.transform.resize must not, so neither path's answer depends on the thread count."""
    img = load_image(sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[0].read_bytes())
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    size = resized_size(*img.shape[:2], 600, 1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = resize(x, size)
        torch.set_num_threads(1)
        one = resize(x, size)
        plain_one = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert not torch.equal(plain_one, two)  # the route this avoids does differ here: the check can fail


def test_fast_path_equals_torch_at_one_thread(shared_data, one_thread):
    """A server pinned to one torch thread (--threads 1) keeps the compiled pass: the self-check
    passes there, and the pass equals torch's path on real photos."""
    assert fast_prepare._self_check()
    for p in sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:6]:
        img = load_image(p.read_bytes())
        np.testing.assert_array_equal(_fast(img, TransformConfig()), _torch_padded(img, TransformConfig()).numpy(),
                                      err_msg=str(p))


@pytest.mark.parametrize(("hw", "size"), [((480, 640), (160, 213)), ((640, 480), (213, 160)),
                                          ((480, 640), (480, 640)), ((300, 900), (100, 300))])
def test_zero_weight_taps_keep_signed_zeros(hw, size):
    """Exact odd downscales (3x: every row's second tap has weight 0) and the identity skip that tap;
    where the kept value is 0 the skipped one's sign still decides the zero's sign, as in torch.
    A mean of exactly 128 / 255 and a negative std make 128 -0 and values below it positive:
    -0 + (+0) is +0, so dropping the skipped tap outright gives -0 where torch has +0."""
    img = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    img[::2] = 128  # every other row, and in the rows between, every other column: kept taps hit 128
    img[:, ::2] = 128
    grey = float(np.float32(128) / np.float32(255))
    mean, std = (grey, 0.5, 0.0), (-0.25, 0.5, 0.25)
    padded = (size[0] + 8, size[1] + 8)
    got = fast_prepare.prepare_padded(img, size, padded, mean, std)
    x = resize(normalize(torch.from_numpy(img).permute(2, 0, 1), mean, std), size)
    want = torch.zeros((3, *padded))
    want[:, :size[0], :size[1]] = x
    want = want.numpy()
    assert (want == 0).any() and np.signbit(want[want == 0]).any()  # the case is there: -0 in the answer
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def _bands(img: np.ndarray, cfg: TransformConfig) -> fast_prepare.Bands:
    def plan(h: int, w: int):
        size = resized_size(h, w, cfg.min_size, cfg.max_size)
        return size, padded_size(size, cfg.size_divisible, cfg.pad_past_edge)
    return fast_prepare.Bands(plan, cfg.image_mean, cfg.image_std)


@pytest.mark.parametrize("hw", [(480, 640), (1200, 1601), (600, 1000), (333, 5000), (3000, 2000), (301, 211)])
@pytest.mark.parametrize("split", [0.0, 0.13, 0.62, 0.999])
def test_bands_equal_the_one_pass_whatever_rows_come_first(hw, split):
    """Output rows prepared per decoded band (either band first, one band, both at once), the rest
    by finish: the one pass's values to the bit, padding zeros included. Up-, down- and no scaling.
    The rows not yet "decoded" hold other values when a band is passed: a row prepared from them
    would differ."""
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    cfg = TransformConfig(image_mean=(0.5, 0.25, 0.125), image_std=(0.3, 0.2, 0.1))
    want = _fast(img, cfg)
    cut = int(hw[0] * split)
    for order in ([(0, cut), (cut, hw[0])], [(cut, hw[0]), (0, cut)], [(0, hw[0])], [(cut, hw[0])]):
        bands = _bands(img, cfg)
        work = 255 - img  # as decoded so far: nothing
        for row0, row1 in order:
            work[row0:row1] = img[row0:row1]
            bands.rows(work, row0, row1)
        work[:] = img
        got = bands.finish(work)
        assert got is not None and bands.size == resized_size(*hw, cfg.min_size, cfg.max_size)
        np.testing.assert_array_equal(got, want, err_msg=str(order))


def test_bands_from_two_threads_at_once():
    """The two decoding threads call rows at the same time on disjoint rows (no GIL in the kernel)."""
    import threading

    img = np.random.default_rng(7).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    cfg = TransformConfig()
    want = _fast(img, cfg)
    for _ in range(5):
        bands = _bands(img, cfg)
        go = threading.Barrier(2)

        def band(row0, row1, b=bands, g=go):
            g.wait()
            b.rows(img, row0, row1)
        threads = [threading.Thread(target=band, args=r) for r in ((0, 930), (930, 1500))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_array_equal(bands.finish(img), want)


def test_bands_finish_only_what_they_prepared(caplog):
    """finish gives None (the caller prepares as usual) for an image other than the one the rows
    came from, a decode that never passed a row, an output under MIN_PIXELS, or a failed rows call."""
    cfg = TransformConfig()
    img = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    bands = _bands(img, cfg)
    assert bands.finish(img) is None  # no rows: nothing was decoded in bands
    bands.rows(img, 0, 300)
    assert bands.finish(img.copy()) is None  # the same pixels, but not the array the rows came from
    bands = _bands(img, cfg)
    bands.rows(img, 0, 300)
    bands.rows(img.copy(), 300, 480)  # a second array: the bands are abandoned
    assert bands.finish(img) is None
    small = TransformConfig(min_size=40, max_size=80)
    bands = _bands(img, small)
    bands.rows(img, 0, 480)
    assert bands.finish(img) is None  # torch's path there, as prepare_padded

    def broken(h, w):
        raise RuntimeError("plan failed")
    bands = fast_prepare.Bands(broken, cfg.image_mean, cfg.image_std)
    bands.rows(img, 0, 480)  # never raises into the decoding thread
    assert bands.finish(img) is None and "plan failed" in caplog.text
