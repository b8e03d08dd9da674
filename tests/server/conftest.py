"""Server tests run the real app (create_app) under uvicorn on a loopback port, with a real tiny model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from srv_helpers import CLASS_NAMES, COCO, serve


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny detector: real code path, meaningless boxes. With a score
    threshold of 0 it returns detections for any image."""
    import torch

    import model

    torch.manual_seed(0)
    cfg = model.preset("tiny", num_classes=len(CLASS_NAMES))
    net = model.build_model(cfg).eval()
    out = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    model.save_checkpoint(out, net, cfg, CLASS_NAMES, provenance={"source": "tests/server"})
    return out


@pytest.fixture(scope="session")
def coco_jpegs() -> list[Path]:
    paths = sorted(COCO.glob("*.jpg"))
    if not paths:
        pytest.skip(f"no COCO128 photos under {COCO}")
    return paths


@pytest.fixture(scope="session")
def make_settings(tiny_checkpoint, tmp_path_factory) -> Callable[..., object]:
    from server.settings import Settings

    def make(**overrides):
        base = dict(model=tiny_checkpoint, backend="torch", score_threshold=0.0,
                    max_batch_size=4, max_delay_ms=20, queue_size=32, workers=2, threads=2,
                    batch_autotune=False)  # the batching tests need batches; test_batch_autotune.py tunes
        base.update(overrides)
        return Settings(_env_file=None, **base)

    return make


@pytest.fixture(scope="session")
def live(make_settings) -> Iterator[str]:
    """One shared server for the contract and bad-input tests."""
    with serve(make_settings(max_images_per_request=4, max_upload_bytes=2_000_000, max_pixels=4_000_000)) as (url, _):
        yield url


PARITY = Path(__file__).resolve().parents[2] / "tools" / "parity_weights.py"


@pytest.fixture(scope="session")
def r50_parity_checkpoint(tmp_path_factory) -> Path:
    """torchvision's R50-FPN layout with tools/parity_weights.py's deterministic stand-in weights,
    "converted" through the torchvision importer, at 600/1000."""
    import importlib.util

    if not PARITY.exists():
        pytest.skip("tools/parity_weights.py missing")
    from model.checkpoint import save_checkpoint
    from model.torchvision_import import class_names_for, load_torchvision, torchvision_config

    spec = importlib.util.spec_from_file_location("parity_weights", PARITY)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    cfg = torchvision_config("resnet50_fpn", 91, min_size=600, max_size=1000)
    net = load_torchvision(parity.parity_state_dict(), cfg)
    out = tmp_path_factory.mktemp("r50") / "r50-parity"
    save_checkpoint(out, net, cfg, class_names_for(91), provenance={"source": "tools/parity_weights.py"})
    return out


@pytest.fixture(scope="session")
def r50_parity_onnx(r50_parity_checkpoint, tmp_path_factory) -> Path:
    """The same checkpoint exported once to ONNX (the slow part; shared by every test that serves it)."""
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(r50_parity_checkpoint, tmp_path_factory.mktemp("r50onnx") / "r50.onnx", verify=False)
