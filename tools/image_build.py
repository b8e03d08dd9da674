"""Building deploy/Dockerfile with podman on a machine without Docker Hub (tools/image_check.py's
steps 1 and 2).

    ensure_base(cache)       localhost/debian-py:bookworm from Debian's packages (debootstrap), kept
                             as a tarball in `cache` so the next run only imports it
    build(image, model, log) `podman build --format docker` (HEALTHCHECK is not in the OCI format)
                             with the local torch wheel and CA bundle from pip's own configuration,
                             mounted for the build only
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/debian-py:bookworm"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]


def log(msg: str) -> None:
    print(f"image-check: {msg}", flush=True)


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, text=True, **kw)


def podman(*args: str, **kw) -> str:
    return sh("podman", *args, capture_output=True, **kw).stdout.strip()


def ensure_base(cache: Path) -> str:
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return "already in podman's storage"
    tarball = cache / "debian-py-bookworm.tar"
    t0 = time.perf_counter()
    if not tarball.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log(f"debootstrap {rootfs} (once; cached as {tarball})")
            sh(*DEBOOTSTRAP, str(rootfs), stdout=subprocess.DEVNULL)
            part = tarball.with_suffix(".part")
            sh("tar", "-C", str(rootfs), "-cf", str(part), ".")
            part.replace(tarball)
    sh("podman", "import", str(tarball), BASE_IMAGE, stdout=subprocess.DEVNULL)
    return f"imported from {tarball} in {time.perf_counter() - t0:.0f} s"


def pip_setting(key: str) -> str | None:
    """A value of pip's own configuration as the host's pip sees it (env var, config files)."""
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        return env
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.split(".")[-1] == key:
            return value.strip().strip("'\"")
    return None


def build_args() -> list[str]:
    """podman build options that feed the host's torch wheel and CA bundle to pip in the build."""
    args = ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    links = [d for d in (pip_setting("find-links") or "").split() if list(Path(d).glob("torch-*.whl"))]
    if links:
        # the local CPU wheel (2.13.0+cpu sorts above the registry's 2.13.0) next to the registry
        index = pip_setting("index-url") or "https://pypi.org/simple"
        args += ["-v", f"{links[0]}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels",
                 "--build-arg", f"TORCH_INDEX_URL={index}"]
    cert = pip_setting("cert")
    if cert and Path(cert).is_file():
        args += ["-v", f"{cert}:/build-ca.crt:ro", "--build-arg", "PIP_CERT=/build-ca.crt"]
    return args


def build(image: str, model_name: str, logfile: Path) -> float:
    cmd = ["podman", "build", "--isolation", "chroot", "--network", "host", "--format", "docker",
           "-f", "deploy/Dockerfile", "--ignorefile", "deploy/Dockerfile.dockerignore",
           "--build-arg", f"MODEL_NAME={model_name}", *build_args(), "-t", image, "."]
    log(" ".join(cmd) + f"  (log: {logfile})")
    t0 = time.perf_counter()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print("\n".join(logfile.read_text().splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(f"image-check: FAIL: podman build exited {rc}")
    return time.perf_counter() - t0
