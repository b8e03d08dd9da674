"""deploy/entrypoint.sh, the CPU image's entrypoint: serves the ONNX baked at build time when the
checkpoint is the baked one, exports any other into EXPORT_CACHE_DIR, then runs the command.

A stand-in `python` records the export calls (the real export runs in `make image-check`, inside
the built image); the script itself, sha256sum and the file tests are the real ones."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, Dockerfile

SCRIPT = DEPLOY / "entrypoint.sh"

# logs each call; `-m export onnx ... --out F` writes F (unless --if-stale finds F, as export does
# when F's metadata records the same checkpoint: here any F counts as fresh)
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in
    *--if-stale*) for a in "$@"; do [ "$prev" = --out ] && [ -f "$a" ] && exit 0; prev=$a; done ;;
esac
while [ $# -gt 0 ]; do
    if [ "$1" = --out ]; then echo onnx > "$2"; fi
    shift
done
"""


@pytest.fixture
def box(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    ckpt = tmp_path / "models" / "demo-tiny-shapes"
    ckpt.mkdir(parents=True)
    (ckpt / "model.json").write_text('{"config": {}}')
    (ckpt / "model.safetensors").write_bytes(b"weights")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "BAKED_ONNX_DIR": str(tmp_path / "baked"), "FRCNN_MODEL": str(ckpt),
           "EXPORT_CACHE_DIR": str(tmp_path / "cache")}
    return env, tmp_path, ckpt


def run(env: dict, *argv: str, **extra: str) -> tuple[subprocess.CompletedProcess, dict, list[str]]:
    calls = Path(env["CALLS"])
    calls.unlink(missing_ok=True)
    out = subprocess.run(["sh", str(SCRIPT), *(argv or ["env"])], env={**env, **extra}, capture_output=True,
                         text=True, timeout=60)
    child = dict(ln.split("=", 1) for ln in out.stdout.splitlines() if "=" in ln)
    return out, child, calls.read_text().splitlines() if calls.exists() else []


def exports(calls: list[str]) -> list[list[str]]:
    return [shlex.split(c) for c in calls if c.startswith("-m export onnx")]


def test_bake_then_serve_the_baked_graph_without_writing(box):
    env, tmp, ckpt = box
    out, _, calls = run(env, "bake", str(ckpt), env["BAKED_ONNX_DIR"])
    assert out.returncode == 0, out.stderr
    baked = tmp / "baked" / "demo-tiny-shapes.onnx"
    assert exports(calls) == [["-m", "export", "onnx", "--checkpoint", str(ckpt), "--out", str(baked)]]
    out, child, calls = run(env)
    assert out.returncode == 0, out.stderr
    assert child["FRCNN_MODEL"] == str(baked)
    assert exports(calls) == [] and not (tmp / "cache").exists(), "the baked model needs no export, no cache"


def test_copy_of_the_baked_checkpoint_is_the_baked_model(box):
    """Kubernetes' init container copies /models into a volume: same files, same digest."""
    env, tmp, ckpt = box
    run(env, "bake", str(ckpt), env["BAKED_ONNX_DIR"])
    copy = tmp / "volume" / ckpt.name
    copy.mkdir(parents=True)
    for f in ckpt.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _, child, calls = run(env, FRCNN_MODEL=str(copy))
    assert child["FRCNN_MODEL"] == str(tmp / "baked" / "demo-tiny-shapes.onnx") and exports(calls) == []


def test_other_checkpoint_is_exported_into_the_cache(box):
    env, tmp, ckpt = box
    run(env, "bake", str(ckpt), env["BAKED_ONNX_DIR"])
    (ckpt / "model.safetensors").write_bytes(b"other weights")  # same name, other model
    out, child, calls = run(env)
    assert out.returncode == 0, out.stderr
    target = tmp / "cache" / "model.onnx"
    assert child["FRCNN_MODEL"] == str(target) and target.read_text() == "onnx\n"
    (argv,) = exports(calls)
    assert argv[argv.index("--checkpoint") + 1] == str(ckpt) and argv[argv.index("--out") + 1] == str(target)
    # a restart with the cache volume kept: export is asked again, and --if-stale makes it a no-op
    assert argv[-1] == "--if-stale"
    target.write_text("kept\n")
    _, child, calls = run(env)
    assert child["FRCNN_MODEL"] == str(target) and target.read_text() == "kept\n"


def test_unbaked_name_and_onnx_file(box):
    env, tmp, ckpt = box
    _, child, calls = run(env)  # nothing baked at all
    assert child["FRCNN_MODEL"] == str(tmp / "cache" / "model.onnx") and len(exports(calls)) == 1
    onnx = tmp / "given.onnx"
    onnx.write_text("x")
    _, child, calls = run(env, FRCNN_MODEL=str(onnx))
    assert child["FRCNN_MODEL"] == str(onnx) and calls == []
    out, _, _ = run({k: v for k, v in env.items() if k != "FRCNN_MODEL"})
    assert out.returncode != 0 and "FRCNN_MODEL" in out.stderr


def test_entrypoint_export_lines_parse():
    """Every `python -m export` line of the script uses options the export CLI has."""
    try:
        from export.__main__ import _parser
    except ImportError as e:
        pytest.skip(f"export not importable: {e}")
    lines = re.findall(r"python -m export (onnx[^\n]*)", SCRIPT.read_text())
    assert len(lines) == 2  # bake, and a mounted checkpoint
    for line in lines:
        _parser().parse_args([re.sub(r"\$\{?\w+\}?", "x", a) for a in shlex.split(line)])


def test_image_wires_the_entrypoint_and_bakes_its_model():
    d = Dockerfile(DEPLOY / "Dockerfile")
    assert d.exec_form("ENTRYPOINT") == ["/usr/local/bin/frcnn-entrypoint"]
    runs = " ".join(d.all("RUN"))
    assert "frcnn-entrypoint bake /models/${MODEL_NAME} /opt/frcnn/onnx" in runs
    # the baked graph lives outside every volume the manifests and compose mount over it
    env = d.env()
    assert not Path("/opt/frcnn/onnx").is_relative_to(env["EXPORT_CACHE_DIR"])
    assert (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().count("!deploy/entrypoint.sh") == 1


def test_numba_s_compiled_kernels_are_copied_where_numba_may_write(box):
    """The image's build compiled the kernels into a read-only directory; the entrypoint copies it to
    NUMBA_CACHE_DIR (an emptyDir's /tmp in the pod) once, never over a cache already there."""
    env, tmp, _ = box
    baked = tmp / "numba-baked"
    (baked / "runtime_abc").mkdir(parents=True)
    (baked / "runtime_abc" / "k.nbi").write_bytes(b"index")
    target = tmp / "tmp" / "numba-cache"
    target.parent.mkdir()
    out, child, _ = run(env, BAKED_NUMBA_CACHE=str(baked), NUMBA_CACHE_DIR=str(target))
    assert out.returncode == 0, out.stderr
    assert (target / "runtime_abc" / "k.nbi").read_bytes() == b"index"
    assert child["NUMBA_CACHE_DIR"] == str(target)
    (target / "runtime_abc" / "k.nbi").write_bytes(b"compiled here since")  # a restart keeps its own
    run(env, BAKED_NUMBA_CACHE=str(baked), NUMBA_CACHE_DIR=str(target))
    assert (target / "runtime_abc" / "k.nbi").read_bytes() == b"compiled here since"
    out, _, _ = run(env, BAKED_NUMBA_CACHE=str(tmp / "none"), NUMBA_CACHE_DIR=str(tmp / "elsewhere"))
    assert out.returncode == 0 and not (tmp / "elsewhere").exists()  # no baked cache: numba compiles


def test_image_compiles_numba_s_kernels_for_the_installed_package():
    """The build fills the cache the entrypoint copies, from the installed package (python -I: /src's
    copy would give a cache numba never finds at the installed path), and the runtime points numba at it."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"NUMBA_CACHE_DIR=/opt/frcnn/numba-cache python -I -c", text)
    assert "NUMBA_CACHE_DIR=/tmp/numba-cache" in text
