"""Settings: environment, CLI overrides, validation."""

from __future__ import annotations

import pytest

from server.__main__ import parse_settings
from server.settings import DEMO_CHECKPOINT, Settings


def test_defaults():
    s = Settings(_env_file=None)
    assert (s.host, s.port, s.backend, s.max_batch_size, s.max_delay_ms, s.queue_size) == (
        "127.0.0.1", 8000, "auto", 8, 10.0, 64)
    assert s.model is None and s.model_path == DEMO_CHECKPOINT
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_images_per_request == 16
    assert s.score_threshold == 0.5 and s.max_detections == 100 and s.api_key is None and s.cors_origins == []


def test_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRCNN_MODEL", str(tmp_path))
    monkeypatch.setenv("FRCNN_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("FRCNN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("FRCNN_API_KEY", "sekrit-123")
    monkeypatch.setenv("FRCNN_LOG_LEVEL", "DEBUG")
    s = Settings(_env_file=None)
    assert s.model == tmp_path and s.max_batch_size == 4 and s.api_key == "sekrit-123" and s.log_level == "debug"
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert "sekrit-123" not in repr(s)  # the key never reaches logs
    monkeypatch.setenv("FRCNN_CORS_ORIGINS", '["https://c.example"]')
    monkeypatch.setenv("FRCNN_MODEL", "")
    s = Settings(_env_file=None)
    assert s.cors_origins == ["https://c.example"] and s.model is None


def test_cli_overrides_environment(monkeypatch):
    monkeypatch.setenv("FRCNN_PORT", "9000")
    monkeypatch.setenv("FRCNN_WORKERS", "3")
    s = parse_settings(["--port", "9100", "--backend", "torch", "--max-batch-size", "2", "--max-delay-ms", "5",
                        "--model", "some.onnx"])
    assert (s.port, s.workers, s.backend, s.max_batch_size, s.max_delay_ms) == (9100, 3, "torch", 2, 5.0)
    assert str(s.model) == "some.onnx"


@pytest.mark.parametrize("argv", [["--backend", "tpu"], ["--max-batch-size", "0"], ["--port", "70000"],
                                  ["--unknown"]])
def test_cli_rejects_bad_values(argv):
    with pytest.raises(SystemExit) as e:
        parse_settings(argv)
    assert e.value.code == 2
