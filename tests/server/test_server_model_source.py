"""Which file and backend the server picks: finished artifacts only, never an export."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from server import model_source
from server.settings import DEMO_CHECKPOINT, Settings


def _settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_explicit_backends_and_suffixes(tiny_checkpoint, tmp_path):
    assert model_source.resolve(_settings(model=tiny_checkpoint)) == (tiny_checkpoint, "torch")
    assert model_source.resolve(_settings(model=tiny_checkpoint, backend="torch")) == (tiny_checkpoint, "torch")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"")
    assert model_source.resolve(_settings(model=onnx)) == (onnx, "onnxruntime")
    assert model_source.resolve(_settings(model=engine)) == (engine, "tensorrt")


def test_a_checkpoint_with_a_graph_backend_says_how_to_export(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"python -m export onnx --checkpoint"):
        model_source.resolve(_settings(model=tiny_checkpoint, backend="onnxruntime"))


def test_missing_model_names_the_demo(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        model_source.resolve(_settings(model=tmp_path / "nothing"))
    if not DEMO_CHECKPOINT.exists():
        with pytest.raises(FileNotFoundError, match="make demo-model"):
            model_source.resolve(_settings())
    assert _settings().model_path == DEMO_CHECKPOINT


def test_checkpoint_served_by_torch_with_a_hint(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="server.model_source"):
        pipe = model_source.load_pipeline(_settings(model=tiny_checkpoint, threads=1))
    assert (pipe.backend_name, pipe.precision) == ("torch", "fp32")
    assert "--if-stale" in caplog.text and "torch backend" in caplog.text


def test_device_and_providers_reach_the_backend(tiny_checkpoint, r50_parity_onnx, monkeypatch):
    """FRCNN_PROVIDERS / --providers pick onnxruntime's execution providers (aliases expanded); one
    this onnxruntime lacks, or a CUDA device torch cannot see, is refused at load with the reason."""
    import onnxruntime as ort
    import torch

    from server.__main__ import parse_settings

    graph = r50_parity_onnx  # the session's graph (exporting one costs about 30 s)
    monkeypatch.setenv("FRCNN_PROVIDERS", "cpu, CPUExecutionProvider")
    assert Settings(_env_file=None).providers == ["cpu", "CPUExecutionProvider"]
    assert parse_settings(["--providers", "cpu"]).providers == ["cpu"]
    pipe = model_source.load_pipeline(_settings(model=graph, providers=["cpu"], threads=1))
    assert pipe.backend.session.get_providers() == ["CPUExecutionProvider"]
    assert pipe.predict([np.zeros((64, 80, 3), np.uint8)])  # it runs
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match=r"CUDAExecutionProvider.*not available here"):
            model_source.load_pipeline(_settings(model=graph, providers=["cuda"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            model_source.load_pipeline(_settings(model=tiny_checkpoint, device="cuda"))
    with pytest.raises(ValueError, match="device"):
        _settings(device="gpu")  # cpu, cuda or cuda:N only


def test_winograd_setting_reaches_the_onnxruntime_backend(r50_parity_onnx, monkeypatch, caplog):
    """On the CPU provider R50-FPN's 19 large 3x3 convolutions run by Winograd F(4x4, 3x3) unless
    FRCNN_WINOGRAD=false / --no-winograd asks for the direct convolution; the log line says which."""
    from server.__main__ import parse_settings

    assert parse_settings([]).winograd is True
    assert parse_settings(["--no-winograd"]).winograd is False
    monkeypatch.setenv("FRCNN_WINOGRAD", "false")
    assert Settings(_env_file=None).winograd is False
    monkeypatch.delenv("FRCNN_WINOGRAD")
    with caplog.at_level(logging.INFO, logger="server.model_source"):
        on = model_source.load_pipeline(_settings(model=r50_parity_onnx, providers=["cpu"], threads=1))
    assert on.backend.winograd_convs == 19 and "Winograd F(4x4, 3x3) on 19 convolutions" in caplog.text
    off = model_source.load_pipeline(_settings(model=r50_parity_onnx, winograd=False, threads=1))
    assert off.backend.winograd_convs == 0
