"""`python -m export verify|triton|tensorrt` through export.__main__.main (the export itself is
covered by the session fixtures; `export onnx` calls the same export_onnx)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from export.__main__ import main
from tests.export.conftest import COCO


def test_verify_passes_on_coco_images_and_reports_json(tiny_checkpoint, tiny_onnx, tmp_path, capsys):
    if not COCO.is_dir():
        pytest.skip("../shared/data missing")
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(COCO.glob("*.jpg"))[:3]:
        shutil.copy(p, images / p.name)
    code = main(["verify", "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_onnx),
                 "--images", str(images), "--batch-size", "2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["images"] == 3 and report["match_rate"] >= 0.99


def test_triton_command_writes_a_repository(tiny_nms_onnx, tmp_path, capsys):
    assert main(["triton", "--model", str(tiny_nms_onnx), "--repo", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "frcnn" / "config.pbtxt").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_command_without_tensorrt_fails_clearly(tiny_onnx, tmp_path, capsys):
    assert main(["tensorrt", "--model", str(tiny_onnx), "--out", str(tmp_path / "m.engine")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
