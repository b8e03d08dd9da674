"""Which file and backend the server picks, the ONNX export cache and the fallback to torch."""

from __future__ import annotations

import logging

import pytest

from server import model_source
from server.settings import DEMO_CHECKPOINT, Settings


def _settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_explicit_backends_and_suffixes(tiny_checkpoint, tmp_path):
    assert model_source.resolve(_settings(model=tiny_checkpoint, backend="torch")) == (tiny_checkpoint, "torch")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"")
    assert model_source.resolve(_settings(model=onnx)) == (onnx, "onnxruntime")
    assert model_source.resolve(_settings(model=engine)) == (engine, "tensorrt")


def test_missing_model_names_the_demo(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing"):
        model_source.resolve(_settings(model=tmp_path / "nothing"))
    if not DEMO_CHECKPOINT.exists():
        with pytest.raises(FileNotFoundError, match="make demo-model"):
            model_source.resolve(_settings())
    assert _settings().model_path == DEMO_CHECKPOINT


def test_a_failed_export_is_not_retried(tiny_checkpoint, tmp_path, caplog):
    pytest.importorskip("export.onnx_export")
    digest = model_source.export_digest(tiny_checkpoint)
    note = tmp_path / f"{tiny_checkpoint.name}-{digest}.failed"
    note.write_text("RuntimeError: earlier failure\n")
    with caplog.at_level(logging.WARNING, logger="server.model_source"):
        assert model_source.resolve(_settings(model=tiny_checkpoint, cache_dir=tmp_path)) == (tiny_checkpoint, "torch")
    assert "earlier failure" in caplog.text and "torch backend" in caplog.text
    with pytest.raises(RuntimeError, match="earlier failure"):  # asked for onnxruntime explicitly: no fallback
        model_source.resolve(_settings(model=tiny_checkpoint, cache_dir=tmp_path, backend="onnxruntime"))


def test_digest_follows_the_checkpoint(tiny_checkpoint, tmp_path):
    pytest.importorskip("export")
    import shutil

    copy = tmp_path / tiny_checkpoint.name
    shutil.copytree(tiny_checkpoint, copy)
    assert model_source.export_digest(copy) == model_source.export_digest(tiny_checkpoint)
    (copy / "model.json").write_text((copy / "model.json").read_text() + " ")
    assert model_source.export_digest(copy) != model_source.export_digest(tiny_checkpoint)


@pytest.mark.slow
def test_auto_exports_once_and_caches(tiny_checkpoint, tmp_path, caplog):
    """backend=auto on a checkpoint: exported to ONNX on the first start, the cached file on the
    second; or, where the export does not work, the torch backend both times (one attempt)."""
    pytest.importorskip("export.onnx_export")
    settings = _settings(model=tiny_checkpoint, cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="server.model_source"):
        first = model_source.load_pipeline(settings)
        second = model_source.load_pipeline(settings)
    assert first.backend_name == second.backend_name
    assert caplog.text.count("exporting") == 1
    if first.backend_name == "torch":
        assert list(tmp_path.glob("*.failed")) and not list(tmp_path.glob("*.onnx"))
    else:
        assert first.backend_name == "onnxruntime" and "using cached ONNX export" in caplog.text
        assert len(list(tmp_path.glob("*.onnx"))) == 1
