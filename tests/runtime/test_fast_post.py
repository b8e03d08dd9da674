"""runtime.fast_post (compiled and numpy) against its torch twin, model.postprocess, to the bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.postprocess import RawDetections, postprocess
from runtime import fast_post


def _raw(rng: np.random.Generator, R: int, C: int, B: int = 1, spread: float = 60.0) -> RawDetections:
    """fast_post.crowded's hard inputs (ties, values on the thresholds, empty boxes, duplicates),
    RoIs of B images interleaved."""
    scores, boxes = fast_post.crowded(rng, R, C, spread)
    batch_idx = rng.permutation(np.arange(R) % B).astype(np.int64)
    return RawDetections(torch.from_numpy(batch_idx), torch.from_numpy(scores), torch.from_numpy(boxes))


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def implementation(request, monkeypatch):
    """Every test against both: the numba kernel (what a server with the extra runs) and numpy."""
    if request.param == "compiled":
        assert fast_post._one() is not fast_post._numpy_one, "numba is installed: the kernel must pass its check"
    else:
        monkeypatch.setattr(fast_post, "_one", lambda: fast_post._numpy_one)
    return request.param


def _both(raw, sizes, originals, **kw):
    with torch.inference_mode():
        want = postprocess(raw, sizes, originals, **kw)
    got = fast_post.postprocess(raw, sizes, originals, **kw)
    assert got is not None
    return want, got


def _assert_same(want, got):
    assert len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        assert g.boxes.dtype == w.boxes.dtype and g.scores.dtype == w.scores.dtype and g.labels.dtype == w.labels.dtype
        assert torch.equal(w.labels, g.labels)
        assert torch.equal(w.scores, g.scores)
        assert torch.equal(w.boxes, g.boxes)


@pytest.mark.parametrize("seed", range(12))
def test_equals_torch_on_crowded_ties(seed):
    rng = np.random.default_rng(seed)
    R, C = int(rng.integers(1, 40)), int(rng.integers(2, 8))
    raw = _raw(rng, R, C)
    sizes = torch.tensor([[int(rng.integers(50, 900)), int(rng.integers(50, 900))]])
    originals = torch.tensor([[int(rng.integers(50, 3000)), int(rng.integers(50, 3000))]])
    for thr, nms in ((0.05, 0.5), (0.0, 0.3), (0.3, 0.7)):
        kw = dict(score_thresh=[thr], nms_thresh=nms, detections_per_img=[100], min_size=1e-2, classes=[None])
        want, got = _both(raw, sizes, originals, **kw)
        _assert_same(want, got)


def test_a_batch_with_per_image_options():
    rng = np.random.default_rng(7)
    raw = _raw(rng, 90, 6, B=3)
    sizes = torch.tensor([[600, 800], [608, 512], [333, 1000]])
    originals = torch.tensor([[480, 640], [1216, 1024], [333, 1000]])
    kw = dict(score_thresh=[0.05, 0.0, 0.3], nms_thresh=0.5, detections_per_img=[100, 5, 0], min_size=1e-2,
              classes=[None, torch.tensor([2, 4]), torch.tensor([], dtype=torch.int64)])
    want, got = _both(raw, sizes, originals, **kw)
    _assert_same(want, got)
    assert len(want[0].scores) > 5 and len(want[1].scores) == 5 and len(want[2].scores) == 0
    assert set(want[1].labels.tolist()) <= {2, 4}


def test_ious_on_the_threshold():
    """Pairs whose IoU is 0.5 exactly or a few float32 steps either side of it, each pair in a class
    of its own: whether the second box of a pair is kept is the NMS threshold's decision alone, and
    the numpy twin takes the same one."""
    scores, boxes = (torch.from_numpy(x) for x in fast_post.on_the_threshold())
    widths = boxes[1::2, :, 3].amax(dim=1).numpy()  # each pair's second box: (0, 0, 10, w)
    raw = RawDetections(torch.zeros(boxes.shape[0], dtype=torch.int64), scores, boxes)
    kw = dict(score_thresh=[0.05], nms_thresh=0.5, detections_per_img=[100], min_size=1e-2, classes=[None])
    want, got = _both(raw, torch.tensor([[20, 20]]), torch.tensor([[20, 20]]), **kw)
    _assert_same(want, got)
    # every first box, and the second exactly where its IoU is not above 0.5: w <= 5
    assert len(want[0].scores) == len(widths) + sum(w <= 5 for w in widths)


def test_equals_torch_on_a_real_model(shared_data):
    from runtime.images import load_image
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-shapes")
    used = 0
    for p in sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:10]:
        batch = pipe.collate([pipe.prepare(load_image(p.read_bytes()))])
        raw = pipe.infer(batch)
        for thr in (0.05, 0.01, 0.5):
            kw = dict(score_thresh=[thr], nms_thresh=pipe.config.roi_heads.nms_thresh, detections_per_img=[100],
                      min_size=pipe.config.roi_heads.min_size, classes=[None])
            want, got = _both(raw, batch.image_sizes, batch.original_sizes, **kw)
            _assert_same(want, got)
            used += len(want[0].scores)
    assert used > 50


def test_where_it_does_not_apply():
    rng = np.random.default_rng(3)
    raw = _raw(rng, 30, 4)
    kw = dict(score_thresh=[0.0], nms_thresh=0.5, detections_per_img=[100], min_size=1e-2, classes=[None])
    sizes, originals = torch.tensor([[100, 100]]), torch.tensor([[100, 100]])
    assert fast_post.postprocess(raw, sizes, originals, **kw) is not None
    half = RawDetections(raw.batch_idx, raw.scores.half(), raw.boxes.half())
    assert fast_post.postprocess(half, sizes, originals, **kw) is None
    mismatched = RawDetections(raw.batch_idx, raw.scores, raw.boxes[:, :-1])  # a class short: never read past it
    assert fast_post.postprocess(mismatched, sizes, originals, **kw) is None
    nan = raw.boxes.clone()
    nan[0, 1, 0] = float("nan")
    assert fast_post.postprocess(RawDetections(raw.batch_idx, raw.scores, nan), sizes, originals, **kw) is None
    many = _raw(rng, fast_post.MAX_CANDIDATES, 3)  # 2 classes per RoI, every score above -1
    kw_all = dict(kw, score_thresh=[-1.0])
    assert fast_post.postprocess(many, sizes, originals, **kw_all) is None


def test_the_first_use_check_catches_a_kernel_that_differs():
    """_self_check is what keeps a numba that computes otherwise off the path: it refuses kernels
    that keep one box too many, order ties otherwise, or round the scale differently."""
    def off_by(change):
        def kernel(*args):
            n, b, s, lab = fast_post._numpy_one(*args)
            return change(n, b, s, lab)
        return kernel
    assert fast_post._self_check(fast_post._numpy_one)
    assert not fast_post._self_check(off_by(lambda n, b, s, lab: (n, b[::-1], s[::-1], lab[::-1])))
    assert not fast_post._self_check(off_by(lambda n, b, s, lab: (n, np.nextafter(b, np.float32(1e9)), s, lab)))
    assert not fast_post._self_check(off_by(lambda n, b, s, lab: (n, b[:-1], s[:-1], lab[:-1])))
