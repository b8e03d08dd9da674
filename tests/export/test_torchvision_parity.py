"""A torchvision-layout R50-FPN (tools/parity_weights.py) exported to ONNX and run by onnxruntime on
one batch of three COCO128 images of different sizes gives torchvision's own detections
(tests/fixtures/tv_r50_golden.safetensors, made by tools/make_golden_model.py in the reference venv)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.verify import load_images, matched_fraction
from model.postprocess import Detections, postprocess
from model.transform import preprocess
from tests.export.conftest import COCO

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "tv_r50_golden.safetensors"
NAMES = ["000000000009", "000000000036", "000000000049"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def r50_onnx(r50_parity):
    """The session's R50 stand-in graph (tests/export/conftest.py), exported once for every test."""
    if not GOLDEN.exists() or not COCO.is_dir():
        pytest.skip("torchvision golden fixture or COCO128 images missing")
    net, path = r50_parity
    return path, net.config


@pytest.mark.parametrize("winograd", [False, True], ids=["direct", "winograd"])
def test_onnxruntime_batch_of_three_sizes_gives_torchvision_detections(r50_onnx, winograd):
    """Both ways onnxruntime runs the graph's convolutions: as the file says, and with the large 3x3
    ones by Winograd F(4x4, 3x3) (the CPU default, runtime/backends/winograd.py)."""
    from safetensors.torch import load_file

    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    path, cfg = r50_onnx
    golden = load_file(str(GOLDEN))
    images = load_images([COCO / f"{n}.jpg" for n in NAMES])
    batch = preprocess(images, cfg.transform)
    assert len({tuple(s) for s in batch.image_sizes.tolist()}) == 3  # three sizes in one padded batch
    for name, size in zip(NAMES, batch.image_sizes, strict=True):
        assert size.tolist() == golden[f"{name}/image_size"].tolist()
    backend = OnnxRuntimeBackend(path, intra_op_threads=2, winograd=winograd)
    # R50-FPN: layer2-4's stride-1 3x3 convs (3 + 5 + 2), FPN's 4 output convs, the RPN conv at 5 levels
    assert backend.winograd_convs == (19 if winograd else 0)
    raw = backend(batch.images, batch.image_sizes)
    rh = cfg.roi_heads
    ours = postprocess(raw, batch.image_sizes, batch.original_sizes, score_thresh=rh.score_thresh,
                       nms_thresh=rh.nms_thresh, detections_per_img=rh.detections_per_img, min_size=rh.min_size)
    theirs = [Detections(golden[f"batch3/{n}/boxes"], golden[f"batch3/{n}/scores"], golden[f"batch3/{n}/labels"])
              for n in NAMES]
    m1, n1 = matched_fraction(ours, theirs, tie_aware=False)
    m2, n2 = matched_fraction(theirs, ours, tie_aware=False)
    assert n1 > 0 and n2 > 0
    assert m1 / n1 >= 0.95 and m2 / n2 >= 0.95, (m1, n1, m2, n2)
