"""Every preset exports, passes the checker and matches its eager model (part of `make test`).

tiny and resnet50_fpn are the session's exports (tests/export/conftest.py's tiny checkpoint,
tests/conftest.py's converted torchvision R50-FPN): tracing costs 30-110 s a graph, and those two
are exported for the other tests anyway. mobilenet_v3_large_fpn and vgg16_c4 are built here.
resnet101_fpn is resnet50_fpn's graph with more bottleneck blocks (the same modules and ops, built by
the same code): exporting it took 46 s and shows nothing resnet50_fpn's case does not, so it is
built and run in tests/model/test_components.py and not exported here."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

from export.tensorrt_ops import tensorrt_problems
from export.verify import quick_verify, synthetic_images
from runtime import Pipeline

pytestmark = pytest.mark.slow


def _graph(name: str, request, tmp_path):
    """(eager net, its config, class names, exported graph path) for preset `name`."""
    if name == "tiny":
        net, meta = request.getfixturevalue("tiny_net")
        return net, meta.config, meta.class_names, request.getfixturevalue("tiny_onnx")
    if name == "resnet50_fpn":
        from model.checkpoint import load_checkpoint

        net, meta = load_checkpoint(request.getfixturevalue("r50_parity_checkpoint"))
        return net.eval(), meta.config, meta.class_names, request.getfixturevalue("r50_parity_onnx")
    import model
    from export.onnx_export import build_graph

    torch.manual_seed(0)
    # the graph starts after preprocessing (normalized, padded images of any size), so the preset's
    # transform sizes are not in it: the images are checked at 320/544 here, where the eager reference
    # (most of these tests' time after tracing) costs less (tests, tracing included: vgg16_c4 113 -> 70 s,
    # mobilenet_v3_large_fpn 117 -> 86 s against 600/1000)
    cfg = model.preset(name, num_classes=11)
    cfg = dataclasses.replace(cfg, transform=dataclasses.replace(cfg.transform, min_size=320, max_size=544))
    net = model.build_model(cfg).eval()
    names = [f"c{i}" for i in range(11)]
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(build_graph(net, cfg, names), str(path))
    return net, cfg, names, path


@pytest.mark.parametrize("name", [pytest.param("tiny", marks=pytest.mark.xdist_group("tiny-onnx")),
                                  pytest.param("resnet50_fpn", marks=pytest.mark.xdist_group("r50-onnx")),
                                  "mobilenet_v3_large_fpn", "vgg16_c4"])
def test_preset_exports_and_matches_eager(name, request, tmp_path):
    net, cfg, names, path = _graph(name, request, tmp_path)
    if name == "resnet50_fpn":  # the session's R50 is the preset's architecture, converted from torchvision
        import model

        assert cfg.backbone == model.preset("resnet50_fpn").backbone
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    problems = tensorrt_problems(proto)
    if name == "vgg16_c4":
        assert problems == ["MaxRoiPool: not supported by the TensorRT 10 ONNX parser"]
    else:
        assert problems == []
    reference = Pipeline.from_model(net, cfg, names)
    report = quick_verify(reference, path, images=synthetic_images(((480, 640), (500, 375)), seed=1))
    assert report.match_rate >= 0.99
