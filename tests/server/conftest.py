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


# r50_parity_checkpoint and r50_parity_onnx: tests/conftest.py (shared with tests/export)
