"""The export gate: ties are not differences; a real difference fails with a clear message and exit 1,
and leaves nothing that looks verified."""

from __future__ import annotations

import copy
import re

import onnx
import pytest
import torch
from onnx import numpy_helper

from export.verify import (
    GateFailed,
    MatchRule,
    compare,
    match_rate,
    matched_fraction,
    quick_verify,
    synthetic_images,
)
from model.postprocess import Detections
from runtime import Pipeline

pytest.importorskip("onnxruntime")


def _dets(boxes, scores, labels) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.int64))


RULE = MatchRule(nms_iou=0.5, score_threshold=0.05, max_detections=2)


def test_a_tie_at_the_top_k_cut_is_excused():
    a = [_dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5], [1, 1])]
    b = [_dets([[0, 0, 10, 10], [80, 80, 90, 90]], [0.9, 0.5], [1, 1])]  # K = 2: the last slot was a tie
    assert matched_fraction(a, b, RULE, tie_aware=False) == (1, 2)
    assert matched_fraction(a, b, RULE) == (2, 2)


def test_a_tie_in_nms_is_excused_but_a_missing_detection_is_not():
    rule = MatchRule(nms_iou=0.5, score_threshold=0.05, max_detections=100)
    # both kept one of two overlapping boxes (IoU 0.67) of equal score: NMS had to choose
    a = [_dets([[0, 0, 10, 10]], [0.8], [2])]
    b = [_dets([[0, 0, 10, 12.5]], [0.8], [2])]
    assert match_rate(a, b, rule, tie_aware=False) == 0.0
    assert match_rate(a, b, rule) == 1.0
    # a confident detection the other side does not have at all, or has with another label, is a difference
    assert match_rate(a, [_dets([], [], [])], rule) == 0.0
    assert match_rate(a, [_dets([[0, 0, 10, 12.5]], [0.8], [3])], rule) == 0.0
    assert match_rate(a, [_dets([[0, 0, 10, 12.5]], [0.5], [2])], rule) == 0.0  # not a tie: score differs
    # at the score threshold, present on one side only: a tie with the cut
    assert match_rate([_dets([[0, 0, 10, 10]], [0.06], [1])], [_dets([], [], [])], rule) == 1.0


def _saturate(net: torch.nn.Module, proto: onnx.ModelProto) -> None:
    """Every RoI gets the same class scores and its proposal as box (untrained-like, saturated): the
    detections tie everywhere, in the eager net and in the graph alike."""
    with torch.no_grad():
        cls = net.roi_heads.box_predictor.cls_score
        cls.weight.zero_()
        cls.bias.zero_()
        cls.bias[1] = 10.0
        net.roi_heads.box_predictor.bbox_pred.weight.zero_()
        net.roi_heads.box_predictor.bbox_pred.bias.zero_()
    # Rewire each head Gemm to fresh initializers: the optimiser may have merged a zero bias with
    # other equal constants, so the original initializers are not theirs alone to change.
    params = dict(net.named_parameters())
    for node in proto.graph.node:
        if node.op_type == "Gemm" and "box_predictor" in node.input[1]:
            layer = node.input[1].removeprefix("net.").rpartition(".")[0]  # roi_heads.box_predictor.cls_score
            for k, suffix in ((1, "weight"), (2, "bias")):
                name = f"saturated.{layer}.{suffix}"
                proto.graph.initializer.append(numpy_helper.from_array(params[f"{layer}.{suffix}"].detach().numpy(), name))
                if k < len(node.input):
                    node.input[k] = name
                else:  # a zero bias may have been dropped from the Gemm altogether
                    node.input.append(name)

def test_a_model_whose_detections_tie_passes_the_gate(tiny_net, tiny_onnx, tmp_path):
    net, meta = copy.deepcopy(tiny_net)
    proto = onnx.load(str(tiny_onnx))
    _saturate(net, proto)
    path = tmp_path / "saturated.onnx"
    onnx.save_model(proto, str(path))
    reference = Pipeline.from_model(net, meta.config, meta.class_names)
    report = quick_verify(reference, path)
    assert report.detections_torch > 0 and report.match_rate >= 0.99, report.to_json()


def test_a_different_graph_fails_with_a_clear_message(tiny_net, tiny_onnx):
    net, meta = copy.deepcopy(tiny_net)
    with torch.no_grad():  # the checkpoint moved on; the graph is the old one
        net.roi_heads.box_predictor.cls_score.weight.mul_(-1.0)
    reference = Pipeline.from_model(net, meta.config, meta.class_names)
    with pytest.raises(GateFailed) as err:
        quick_verify(reference, tiny_onnx)
    msg = str(err.value)
    assert re.search(r"failed its \w+ gate", msg) and "% of detections match" in msg
    assert "python -m export verify" in msg and "--no-verify" in msg
    assert err.value.report.match_rate < 0.99


def test_verify_cli_exits_1_on_a_failed_gate(tiny_checkpoint, tiny_net, tiny_onnx, tmp_path, capsys):
    from export.__main__ import main
    from model.checkpoint import save_checkpoint

    net, meta = copy.deepcopy(tiny_net)
    with torch.no_grad():
        net.roi_heads.box_predictor.cls_score.weight.mul_(-1.0)
    other = tmp_path / "moved-on"
    save_checkpoint(other, net, meta.config, meta.class_names)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, img in enumerate(synthetic_images(((240, 320), (200, 260)))):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(images / f"{i}.png")
    assert main(["verify", "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_onnx),
                 "--images", str(images)]) == 0
    assert main(["verify", "--checkpoint", str(other), "--model", str(tiny_onnx), "--images", str(images)]) == 1
    assert re.search(r"failed its \w+ gate", capsys.readouterr().err)


def test_a_failed_gate_leaves_no_graph(tiny_checkpoint, tmp_path, monkeypatch):
    """The gate runs on a temporary file; on failure neither it nor the target exists."""
    import export.verify
    from export.onnx_export import export_onnx

    def failing_gate(reference, model_path, **kw):
        report, _, _ = compare(reference, kw["other"], synthetic_images(((64, 64),)))
        raise GateFailed("forced for the test", report)

    monkeypatch.setattr(export.verify, "quick_verify", failing_gate)
    out = tmp_path / "m.onnx"
    with pytest.raises(GateFailed):
        export_onnx(tiny_checkpoint, out)
    assert list(tmp_path.iterdir()) == []
