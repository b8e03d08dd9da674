"""Shared, session-scoped exports: one tiny checkpoint exported once as a raw and once as a --with-nms
graph (exporting is the slow part of these tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128" / "train2017"
CLASS_NAMES = ["__background__", "circle", "square", "triangle", "star"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Randomly initialised tiny detector (5 classes): real code path, meaningless but plentiful boxes.

    The heads get wider weights than their training init (std 0.01) so objectness and class scores
    spread out: near-ties would make the RPN's top-k and NMS choices arbitrary, in any runtime."""
    import model

    torch.manual_seed(0)
    cfg = model.preset("tiny", num_classes=len(CLASS_NAMES))
    net = model.build_model(cfg).eval()
    with torch.no_grad():
        net.rpn.head.cls_logits.weight.normal_(std=0.5)
        net.rpn.head.bbox_pred.weight.normal_(std=0.05)
        net.roi_heads.box_predictor.cls_score.weight.normal_(std=0.1)
        net.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    model.save_checkpoint(out, net, cfg, CLASS_NAMES, provenance={"source": "tests/export"})
    return out


@pytest.fixture(scope="session")
def tiny_net(tiny_checkpoint):
    from model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx", verify=False)


@pytest.fixture(scope="session")
def tiny_nms_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny_nms.onnx", with_nms=True,
                       max_detections=20, verify=False)


@pytest.fixture(scope="session")
def coco_images() -> list[torch.Tensor]:
    """Four COCO128 photos as (3, h, w) uint8 (different sizes and aspect ratios)."""
    from export.verify import list_images, load_images

    if not COCO.is_dir():
        pytest.skip(f"{COCO} not found (needs ../shared/data)")
    return load_images(list_images(COCO, limit=4))


def _reduced(fp32_path: Path, out: Path, precision: str, reference, calib: list | None,
             held_out: list | None) -> Path:
    """fp32 graph -> `precision` graph, gated as `export onnx --precision` gates it (GateFailed
    fails the fixture, so every test using it fails too). reference: the eager model's Pipeline."""
    import onnx

    from export.precision import calibration_feeds, to_precision
    from export.verify import quick_verify
    from runtime.pipeline import Pipeline

    feeds = calibration_feeds(reference, calib) if calib else None
    onnx.save_model(to_precision(onnx.load(str(fp32_path)), precision, feeds=feeds), str(out))
    quick_verify(reference, out, other=Pipeline.load(out, threads=2), real_images=held_out)
    return out


def _coco_arrays(first: int, count: int):
    from runtime.images import list_images, load_image

    if not COCO.is_dir():
        pytest.skip(f"{COCO} not found (needs ../shared/data)")
    return [load_image(p) for p in list_images(COCO)[first:first + count]]


@pytest.fixture(scope="session")
def tiny_int8_onnx(tiny_onnx, tiny_net, tmp_path_factory) -> Path:
    """The tiny graph in int8, calibrated on 8 COCO128 photos and gated on 4 others."""
    net, meta = tiny_net
    return _reduced(tiny_onnx, tmp_path_factory.mktemp("onnx") / "tiny.int8.onnx", "int8",
                    _reference(net, meta.config, meta.class_names), _coco_arrays(0, 8), _coco_arrays(8, 4))


@pytest.fixture(scope="session")
def tiny_fp16_onnx(tiny_onnx, tiny_net, tmp_path_factory) -> Path:
    net, meta = tiny_net
    return _reduced(tiny_onnx, tmp_path_factory.mktemp("onnx") / "tiny.fp16.onnx", "fp16",
                    _reference(net, meta.config, meta.class_names), None, _coco_arrays(8, 4))


@pytest.fixture(scope="session")
def r50_parity(r50_parity_checkpoint, r50_parity_onnx):
    """(net, fp32 graph path): the converted torchvision R50-FPN with tools/parity_weights.py's
    stand-in weights and its ONNX export, the same pair the server tests serve (tests/conftest.py:
    exported once for the whole session, about 30 s)."""
    from model.checkpoint import load_checkpoint

    net, _ = load_checkpoint(r50_parity_checkpoint)
    return net.eval(), r50_parity_onnx


@pytest.fixture(scope="session")
def r50_reference(r50_parity):
    """The eager R50-FPN's Pipeline, remembering its backend's outputs: both reduced graphs are gated
    on the same images (export.verify.quick_verify's synthetic ones and two held-out photos), and the
    eager R50 on them is most of a gate's time (about 45 s); the second gate gets the first one's
    outputs, which is what running the same deterministic model on the same batch gives."""
    from model.coco_names import COCO_91

    net, _ = r50_parity
    reference = _reference(net, net.config, list(COCO_91))
    reference.backend = _Remembered(reference.backend)
    return reference


@pytest.fixture(scope="session")
def r50_int8_onnx(r50_parity_onnx, r50_reference, tmp_path_factory) -> Path:
    return _reduced(r50_parity_onnx, tmp_path_factory.mktemp("r50") / "r50.int8.onnx", "int8", r50_reference,
                    _coco_arrays(0, 4), _coco_arrays(8, 2))


@pytest.fixture(scope="session")
def r50_fp16_onnx(r50_parity_onnx, r50_reference, tmp_path_factory) -> Path:
    return _reduced(r50_parity_onnx, tmp_path_factory.mktemp("r50") / "r50.fp16.onnx", "fp16", r50_reference,
                    None, _coco_arrays(8, 2))


def _reference(net, cfg, class_names):
    from runtime.pipeline import Pipeline

    return Pipeline.from_model(net, cfg, class_names, name="reference")


class _Remembered:
    """A backend that runs each distinct (images, image_sizes) batch once and answers repeats with
    copies of that first call's outputs. The key is the batch's bytes, shapes and dtypes."""

    def __init__(self, backend) -> None:
        self.backend, self._seen = backend, {}

    def __getattr__(self, name):  # name, precision, config...: the wrapped backend's
        return getattr(self.backend, name)

    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor):
        from tests.conftest import tensors_digest

        key = tensors_digest((("images", images), ("image_sizes", image_sizes)))
        if key not in self._seen:
            self._seen[key] = self.backend(images, image_sizes)
        return type(self._seen[key])(*(t.clone() for t in self._seen[key]))
