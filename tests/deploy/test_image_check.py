"""tools/image_check.py's own judgement, without building anything: the answer comparison it
passes or fails the image on, and the build options it takes from pip's configuration.

`make image-check` itself (root, podman, minutes) is run by .ci/run after `make test`."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
from deploy_support import ROOT


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("frcnn_tools_image_check", ROOT / "tools" / "image_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def builder(tool):
    """tools/image_build.py, the build half image_check imports (tools/ is on its path)."""
    return sys.modules["image_build"]


ANSWER = [{"image": "a.jpg", "width": 640, "height": 480, "detections": [
    {"box": [1.0, 2.0, 30.5, 40.25], "score": 0.91, "label": "circle", "label_id": 1},
    {"box": [100.0, 120.0, 200.0, 220.0], "score": 0.42, "label": "square", "label_id": 2}]}]


def test_equal_answers_pass_with_their_count(tool):
    assert tool.compare(ANSWER, copy.deepcopy(ANSWER)) == (2, 0.0)


def test_within_tolerance_passes_and_reports_the_difference(tool):
    near = copy.deepcopy(ANSWER)
    near[0]["detections"][1]["box"][2] += tool.TOLERANCE / 2
    n, worst = tool.compare(ANSWER, near)
    assert n == 2 and worst == pytest.approx(tool.TOLERANCE / 2)


@pytest.mark.parametrize("change", ["label", "count", "box", "size", "name"])
def test_different_answers_fail(tool, change):
    other = copy.deepcopy(ANSWER)
    r = other[0]
    if change == "label":
        r["detections"][0]["label"] = "square"
    elif change == "count":
        r["detections"].pop()
    elif change == "box":
        r["detections"][0]["box"][0] += 0.01
    elif change == "size":
        r["width"] = 641
    else:
        r["image"] = "b.jpg"
    with pytest.raises(AssertionError):
        tool.compare(ANSWER, other)


def test_build_args_feed_pips_own_wheels_and_ca(builder, monkeypatch, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    monkeypatch.setenv("PIP_FIND_LINKS", f"/nonexistent {wheels}")
    monkeypatch.setenv("PIP_CERT", str(ca))
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    args = builder.build_args()
    assert args[:2] == ["--build-arg", f"PYTHON_IMAGE={builder.BASE_IMAGE}"]
    assert f"{wheels}:/wheels:ro" in args and "PIP_FIND_LINKS=/wheels" in args
    assert "TORCH_INDEX_URL=https://mirror.example/simple" in args
    assert f"{ca}:/build-ca.crt:ro" in args and "PIP_CERT=/build-ca.crt" in args


def test_build_args_without_a_local_torch_keep_the_dockerfiles_index(builder, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # no torch wheel there
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.crt"))
    args = builder.build_args()
    assert not any(a.startswith(("TORCH_INDEX_URL=", "PIP_FIND_LINKS=", "PIP_CERT=")) for a in args)
