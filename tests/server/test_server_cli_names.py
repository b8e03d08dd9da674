"""One name per concept: --threads / FRCNN_THREADS; the old spellings still work and say so."""

from __future__ import annotations

from server.__main__ import parse_settings
from server.settings import Settings


def test_threads_and_its_deprecated_spellings(capsys, monkeypatch):
    assert parse_settings(["--threads", "3"]).threads == 3
    assert capsys.readouterr().err == ""
    assert parse_settings(["--intra-op-threads", "2"]).threads == 2
    assert "--intra-op-threads is deprecated; use --threads" in capsys.readouterr().err
    monkeypatch.setenv("FRCNN_INTRA_OP_THREADS", "5")
    assert Settings(_env_file=None).threads == 5
    monkeypatch.setenv("FRCNN_THREADS", "4")
    assert Settings(_env_file=None).threads == 4
