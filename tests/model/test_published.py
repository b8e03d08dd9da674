"""`python -m model fetch`: torchvision's published weights by name, checked by sha256 before
anything is cached. No network here: a file:// URL of stand-in weights in torchvision's format
(tools/parity_weights.py) plays the download."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from model.__main__ import main
from model.checkpoint import read_meta
from model.published import PUBLISHED

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory) -> Path:
    from parity_weights import parity_state_dict

    path = tmp_path_factory.mktemp("weights") / "fasterrcnn_mobilenet_v3_large_fpn-standin.pth"
    torch.save(parity_state_dict("mobilenet_v3_large_fpn"), path)
    return path


def test_wrong_checksum_is_a_clear_error_and_caches_nothing(standin_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "ckpt"
    # the stand-in is not torchvision's file: the recorded sha256 of the real weights refuses it
    code = main(["fetch", "coco-mnv3", "--url", standin_weights.as_uri(), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"does not match the expected {PUBLISHED['coco-mnv3'].sha256}" in err and "nothing was cached" in err
    assert not out.exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no .pth, no .part


def test_fetch_converts_checks_and_is_a_no_op_the_second_time(standin_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sha = hashlib.sha256(standin_weights.read_bytes()).hexdigest()
    out = tmp_path / "ckpt"
    args = ["fetch", "coco-mnv3", "--url", standin_weights.as_uri(), "--sha256", sha, "--out", str(out)]
    assert main(args) == 0
    meta = read_meta(out)
    assert meta.provenance["weights_sha256"] == sha and meta.provenance["arch"] == "mobilenet_v3_large_fpn"
    assert len(meta.class_names) == 91 and meta.class_names[1] == "person"
    cached = tmp_path / "cache" / "frcnn" / "weights" / Path(PUBLISHED["coco-mnv3"].url).name
    assert cached.read_bytes() == standin_weights.read_bytes()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    # converted from these weights already: nothing is read again, not even the URL (gone now)
    assert main([*args[:3], (standin_weights.parent / "gone.pth").as_uri(), *args[4:]]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # a damaged cache entry is not trusted: fetched again (and checked) for a new checkpoint
    cached.write_bytes(b"garbage")
    assert main([*args[:-1], str(tmp_path / "ckpt2")]) == 0
    assert cached.read_bytes() == standin_weights.read_bytes()
