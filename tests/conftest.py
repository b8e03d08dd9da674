"""Fixtures shared by every test package.

The real data lives next to the checkout, in ../shared/data (coco128, cocoeval-fake100); tests
that need it take `shared_data` and are skipped, with the reason, where it is absent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# `make test` runs the suite in one process per core (pytest-xdist, --dist loadgroup). A session
# fixture is built once in every process that needs it, and these are exports (30-120 s each, most of
# it tracing): the tests that take one run in one process, so that each is built (or traced, see
# one_trace_per_graph) once. Tests that fetch one with request.getfixturevalue carry the group's
# xdist_group mark themselves. A fixture name counts only under its directory, when one is given
# (tests/server has a tiny_checkpoint of its own that nothing exports).
SHARED_EXPORTS = {
    "r50-onnx": ("", ("r50_parity_onnx", "r50_parity", "r50_reference", "r50_int8_onnx", "r50_fp16_onnx")),
    "tiny-onnx": ("tests/export/", ("tiny_checkpoint", "tiny_net", "tiny_onnx", "tiny_nms_onnx", "tiny_int8_onnx",
                                    "tiny_fp16_onnx")),
}

# OpenMP workers that spin after a parallel region take the core another test process is using.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def export_group(item) -> str | None:
    """The SHARED_EXPORTS group of a collected test, or None."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if callspec is not None:  # parametrized by fixture name (request.getfixturevalue(which))
        names |= {v for v in callspec.params.values() if isinstance(v, str)}
    for group, (directory, fixtures) in SHARED_EXPORTS.items():
        if names.intersection(fixtures) and item.nodeid.startswith(directory):
            return group
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the marks into node id suffixes
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = export_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def tensors_digest(named, prefix: str = "") -> str:
    """sha256 of (name, tensor) pairs: every name, dtype, shape and byte of the values, after `prefix`."""
    import torch

    h = hashlib.sha256(prefix.encode())
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def one_trace_per_graph():
    """export.onnx_export.build_graph memoised for the session, keyed by everything the graph is
    made from: the weights (every tensor's bytes), the config, the class names and the keywords.

    Tracing costs about 30 s whatever the model's size (torch.export's decompositions), and many
    tests export the same checkpoint with the same arguments (export_onnx's gate and atomic write,
    the CLI's paths, Triton's repository from a checkpoint). The first call of each key traces for
    real; later ones get a copy of that graph (callers mutate its metadata), which is what tracing
    the same inputs again gives (build_graph is deterministic)."""
    try:
        import onnx

        import export.onnx_export as onnx_export
    except ImportError:  # a partial install: nothing to memoise
        yield
        return
    real, graphs = onnx_export.build_graph, {}

    def memoised(net, cfg, class_names, **kwargs):
        key = tensors_digest(net.state_dict().items(), repr((cfg, list(class_names), sorted(kwargs.items()))))
        if key not in graphs:
            graphs[key] = real(net, cfg, class_names, **kwargs)
        copy = onnx.ModelProto()
        copy.CopyFrom(graphs[key])
        return copy

    mp = pytest.MonkeyPatch()
    mp.setattr(onnx_export, "build_graph", memoised)
    yield graphs
    mp.undo()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is not there."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (expected next to the checkout)")
    return data


@pytest.fixture(scope="session")
def coco128_all(shared_data: Path) -> list[Path]:
    """Every COCO128 train2017 jpg, sorted; skips the test when there are none."""
    images = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))
    if not images:
        pytest.skip(f"no coco128 images under {shared_data / 'coco128' / 'train2017'}")
    return images


@pytest.fixture(scope="session")
def coco128_images(coco128_all: list[Path]) -> list[Path]:
    """A few real COCO train2017 jpgs (sorted, so the same ones every run)."""
    return coco128_all[:4]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: golden files written by tools/make_golden_*.py."""
    return FIXTURES


PARITY = REPO_ROOT / "tools" / "parity_weights.py"


@pytest.fixture(scope="session")
def r50_parity_checkpoint(tmp_path_factory) -> Path:
    """torchvision's R50-FPN layout with tools/parity_weights.py's deterministic stand-in weights,
    "converted" through the torchvision importer, at 600/1000."""
    import importlib.util

    if not PARITY.exists():
        pytest.skip("tools/parity_weights.py missing")
    spec = importlib.util.spec_from_file_location("parity_weights", PARITY)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    return parity.save_parity_checkpoint(tmp_path_factory.mktemp("r50") / "r50-parity")


@pytest.fixture(scope="session")
def r50_parity_onnx(r50_parity_checkpoint, tmp_path_factory) -> Path:
    """The same checkpoint exported once to ONNX (the slow part; shared by every test that serves it)."""
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(r50_parity_checkpoint, tmp_path_factory.mktemp("r50onnx") / "r50.onnx", verify=False)
