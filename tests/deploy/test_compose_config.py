"""deploy/compose.yaml through a real Compose implementation: podman-compose's `config` (the dev
extra installs it; it wants a podman binary on PATH, Debian's `podman` package) resolves anchors,
profiles and the build context the way `up` would, and refuses what `up` would refuse."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY, ROOT, Dockerfile

COMPOSE = DEPLOY / "compose.yaml"


def podman_compose() -> str:
    found = Path(sys.executable).parent / "podman-compose"
    exe = str(found) if found.exists() else shutil.which("podman-compose")
    if exe is None:
        pytest.skip("podman-compose not installed (dev extra: make install)")
    if shutil.which("podman") is None:
        pytest.skip("podman-compose needs a podman binary on PATH (apt-get install podman)")
    return exe


def config(path: Path, *profiles: str) -> subprocess.CompletedProcess:
    argv = [podman_compose(), "-f", str(path)]
    for p in profiles:
        argv += ["--profile", p]
    return subprocess.run([*argv, "config"], capture_output=True, text=True, timeout=120, cwd=ROOT)


def resolved(*profiles: str) -> dict:
    out = config(COMPOSE, *profiles)
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


def test_cpu_service_as_compose_resolves_it():
    svc = resolved()["services"]
    assert set(svc) == {"server"}, "gpu and triton services are behind profiles"
    server = svc["server"]
    image = Dockerfile(ROOT / server["build"]["dockerfile"])
    env = image.env()
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert server["image"] == "frcnn:latest"
    (port,) = server["ports"]
    host, _, container = str(port).rpartition(":")
    assert container == env["FRCNN_PORT"] and image.all("EXPOSE") == [container] and host == "8000"
    # the image's read-only promise: root read-only, /tmp a tmpfs, the export cache a named volume
    assert server["read_only"] is True and server["tmpfs"] == ["/tmp"]
    assert any(v.split(":")[1] == env["EXPORT_CACHE_DIR"] for v in server["volumes"])
    assert "command" not in server and "entrypoint" not in server


def test_profiles_add_gpu_and_triton():
    svc = resolved("gpu", "triton")["services"]
    assert set(svc) == {"server", "server-gpu", "triton"}
    gpu = svc["server-gpu"]
    env = Dockerfile(ROOT / gpu["build"]["dockerfile"]).env()
    assert [str(p).rpartition(":")[2] for p in gpu["ports"]] == [env["FRCNN_PORT"]]
    assert any(v.split(":")[1] == env["EXPORT_CACHE_DIR"] for v in gpu["volumes"])


def test_the_parser_refuses_a_broken_file(tmp_path):
    """The check can fail: an undeclared named volume, as a typo would make one, is refused."""
    text = COMPOSE.read_text().replace("onnx-cache:/var/cache/frcnn", "onnx-cahce:/var/cache/frcnn")
    assert "onnx-cahce" in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text)
    out = config(broken)
    assert out.returncode != 0 and "onnx-cahce" in out.stderr
