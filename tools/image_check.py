"""Build deploy/Dockerfile with podman and serve from the built image, the way a pod would run it.

    python tools/image_check.py [--image localhost/frcnn:check] [--cache .cache/image] [--photos N]

Needs root, podman and debootstrap (Debian packages). Steps:
  1. base image localhost/debian-py:bookworm from Debian's packages (debootstrap), kept as a tarball
     in --cache so the next run only imports it; no Docker Hub needed
  2. `podman build --format docker` (HEALTHCHECK is not in the OCI format) with the local torch wheel
     and CA bundle from pip's own configuration, mounted for the build only
  3. in a private mount and network namespace (its own loopback, so the image's port 8000 is ours):
     the image's filesystem (`podman image mount`) read-only under an overlay, the Kubernetes
     Deployment's volumes (deploy/k8s/base) as the only writable paths, and every process run by
     chroot as the image's USER with exactly the image's Env and WorkingDir:
       - the Deployment's claims: user id, read-only root with the declared writable mounts, the
         init container filling the model volume, probe paths and port
       - ENTRYPOINT + CMD started, the image's HEALTHCHECK command polled until it passes
       - real photos POSTed to /detect, answers compared with `python -m server` from this checkout
       - SIGTERM while a request is in flight: the request is answered, the server exits 0
       - a different checkpoint mounted: the entrypoint exports it into the cache volume and serves it
  4. figures: build time, image size, time to ready

Steps 1 and 2 live in tools/image_build.py, the pod of step 3 (overlay, mounts, chroot) in
tools/image_pod.py; this file runs the checks and prints the figures.

`podman run` is not used: this sandbox refuses the OCI runtime's setrlimit. chroot + namespaces
stand in for it; what the image declares (user, env, workdir, entrypoint, healthcheck) is applied
from `podman image inspect`, not repeated here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script: its sibling modules
from image_build import BASE_IMAGE, ROOT, build, ensure_base, log, podman, sh  # noqa: E402
from image_pod import Pod, deployment  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "coco128" / "train2017"
REF_PORT = 8001  # the checkout's server, beside the image's inside the private network namespace


# --- 3: checks on the running image -------------------------------------------------------------------


def wait_until(what: str, check, deadline_s: float, every_s: float = 0.2,
               proc: subprocess.Popen | None = None) -> float:
    """Poll `check` until it is true (a probe, as the kubelet and Docker poll); seconds it took.
    Gives up at once when `proc`, the process being waited for, has exited."""
    t0 = time.perf_counter()
    while True:
        if check():
            return time.perf_counter() - t0
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"image-check: FAIL: waiting for {what}, the server exited {proc.returncode}")
        if time.perf_counter() - t0 > deadline_s:
            raise SystemExit(f"image-check: FAIL: {what} not within {deadline_s:.0f} s")
        time.sleep(every_s)


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def check_claims(pod: Pod, server: dict, spec: dict, port: int, writable: list[str]) -> dict:
    """The Deployment's claims about the image, on the image itself."""
    sc = spec["securityContext"]
    assert (pod.uid, pod.gid) == (sc["runAsUser"], sc["runAsGroup"]) and pod.uid != 0, (pod.user, sc)
    exposed = {int(p.split("/")[0]) for p in pod.config.get("ExposedPorts", {})}
    env = dict(e.split("=", 1) for e in pod.env())
    (http,) = [p["containerPort"] for p in server["ports"] if p["name"] == "http"]
    assert http == port == int(env["FRCNN_PORT"]) and exposed == {port}, (http, port, exposed)
    # every path the server might write, tried as the image's user: only the declared mounts take it
    probe = ("import json, os, sys\nout = {}\nfor d in sys.argv[1:]:\n"
             "    try:\n        p = os.path.join(d, '.image-check-probe'); open(p, 'w').close(); os.unlink(p)\n"
             "        out[d] = 'writable'\n    except OSError as e:\n        out[d] = e.strerror\n"
             "print(json.dumps({'ids': [os.getuid(), os.getgid()], 'paths': out}))")
    targets = ["/", pod.config.get("WorkingDir") or "/", "/opt/frcnn/onnx", "/opt/venv", "/models", "/etc", *writable]
    out = pod.run(["python", "-c", probe, *targets], check=True)
    seen = json.loads(out.stdout)
    assert seen["ids"] == [pod.uid, pod.gid], seen
    for d, what in seen["paths"].items():
        assert (what == "writable") == (d in writable), f"{d}: {what}"
    return seen["paths"]


def post_photos(url: str, photos: list[Path], **fields) -> list[dict]:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    r = httpx.post(url + "/detect", files=files, data={k: str(v) for k, v in fields.items()}, timeout=120)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return r.json()["results"]


TOLERANCE = 1e-4  # px and score; the same export code and the same wheels should give 0


def compare(image_results: list[dict], host_results: list[dict]) -> tuple[int, float]:
    """(detections compared, largest |difference| of a box coordinate or score): sizes, counts and
    labels must match exactly, boxes and scores within TOLERANCE."""
    assert [r["image"] for r in image_results] == [r["image"] for r in host_results]
    n, worst = 0, 0.0
    for a, b in zip(image_results, host_results):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        da, db = a["detections"], b["detections"]
        assert [d["label"] for d in da] == [d["label"] for d in db], (a["image"], da, db)
        for x, y in zip(da, db):
            worst = max(worst, abs(x["score"] - y["score"]), *(abs(p - q) for p, q in zip(x["box"], y["box"])))
            n += 1
    assert worst <= TOLERANCE, f"image and host answers differ by {worst}"
    return n, worst


def preprocessed(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r"^frcnn_preprocess_seconds_count (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def drain(proc: subprocess.Popen, url: str, photos: list[Path], grace_s: float) -> tuple[list[dict], float]:
    """SIGTERM once a request's images are being worked on; it must still be answered."""
    before = preprocessed(url)
    box: dict = {}

    def request() -> None:
        try:
            box["results"] = post_photos(url, photos, score_threshold=0.05)
        except Exception as e:  # reported below, in the main thread
            box["error"] = e
        box["t"] = time.perf_counter()

    t = threading.Thread(target=request)
    t.start()
    wait_until("the drain request in the server", lambda: preprocessed(url) > before or "t" in box, 30, 0.005)
    t_term = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    t.join(grace_s)
    assert "error" not in box, f"request during SIGTERM failed: {box.get('error')!r}"
    assert box["t"] > t_term, "the request was answered before SIGTERM: nothing was drained"
    rc = proc.wait(grace_s)
    # uvicorn finishes its graceful shutdown, then re-raises the signal: exit by SIGTERM (143 to a
    # container runtime) after "shutdown complete" is a clean stop; anything else is not
    assert rc in (0, -signal.SIGTERM), f"server exited {rc} after SIGTERM"
    return box["results"], box["t"] - t_term


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def serve_checks(args: argparse.Namespace) -> dict:
    """Runs inside `unshare --mount --net`: nothing mounted here outlives it, port 8000 is free."""
    sh("ip", "link", "set", "lo", "up")
    config = json.loads(Path(args.inspect).read_text())
    work = Path(args.work)
    pod = Pod(Path(args.image_root), config, work)
    spec, server, init = deployment()
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = [m["mountPath"] for m in server["volumeMounts"] if not m.get("readOnly")]
    init_mounts = [m["mountPath"] for m in init["volumeMounts"]]
    pod.prepare_mountpoints(writable + init_mounts + [m["mountPath"] for m in server["volumeMounts"]])
    host_dirs = {}
    for name, v in volumes.items():
        assert "emptyDir" in v, f"volume {name}: only emptyDir volumes are emulated here"
        host_dirs[name] = work / f"vol-{name}"
        host_dirs[name].mkdir()
        host_dirs[name].chmod(0o777)  # as the kubelet makes an emptyDir
    env = dict(e.split("=", 1) for e in pod.env())
    port = int(env["FRCNN_PORT"])
    report: dict = {}

    # the init container, as the Deployment runs it: copies the image's /models into the volume
    for m in init["volumeMounts"]:
        pod.mount(host_dirs[m["name"]], m["mountPath"])
    sh(*pod.argv(init["command"]))
    for m in init["volumeMounts"]:
        pod.unmount(m["mountPath"])
    for m in server["volumeMounts"]:
        pod.mount(host_dirs[m["name"]], m["mountPath"], read_only=bool(m.get("readOnly")))
    report["paths"] = check_claims(pod, server, spec, port, writable)
    log(f"user {pod.user}, root read-only, writable only {writable}: as deploy/k8s/base claims")

    # the checkout's server, exported the way `make serve` does it, for the answers to compare with
    photos = sorted(Path(args.photos_dir).glob("*.jpg"))[: args.photos]
    assert len(photos) == args.photos, f"fewer than {args.photos} photos in {args.photos_dir}"
    ckpt = ROOT / args.model
    ref_onnx = Path(args.ref_onnx)  # exported by main() while the image was being built
    ref_env = {k: v for k, v in os.environ.items() if not k.startswith("FRCNN_")}
    ref_env.update({k: v for k, v in env.items() if k.startswith("FRCNN_")})  # the image's settings
    ref_env.update(FRCNN_HOST="127.0.0.1", FRCNN_PORT=str(REF_PORT))

    t0 = time.perf_counter()
    proc = pod.start(work / "server-a.log")
    health = config["Healthcheck"]
    assert health["Test"][0] == "CMD", health
    deadline = health.get("StartPeriod", 180e9) / 1e9
    report["healthy_s"] = wait_until("HEALTHCHECK", lambda: pod.run(health["Test"][1:]).returncode == 0, deadline,
                                     proc=proc)
    url = f"http://127.0.0.1:{port}"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = server[kind]["httpGet"]
        probe_port = port if p["port"] == "http" else p["port"]
        wait_until(f"{kind} {p['path']}", lambda u=f"http://127.0.0.1:{probe_port}{p['path']}": get_ok(u), 60,
                   proc=proc)
    report["ready_s"] = time.perf_counter() - t0
    log(f"time to ready: HEALTHCHECK passed {report['healthy_s']:.1f} s after start, "
        f"all probes 200 at {report['ready_s']:.1f} s")
    ref = subprocess.Popen([sys.executable, "-m", "server", "--model", str(ref_onnx)], cwd=ROOT, env=ref_env,
                           stdout=(work / "host-server.log").open("w"), stderr=subprocess.STDOUT)
    ref_url = f"http://127.0.0.1:{REF_PORT}"
    wait_until("host server /ready", lambda: get_ok(ref_url + "/ready"), 120, proc=ref)

    n, worst = 0, 0.0
    for p in photos[:4]:  # one by one, default threshold and a low one (more boxes to compare)
        for fields in ({}, {"score_threshold": 0.05}):
            dn, w = compare(post_photos(url, [p], **fields), post_photos(ref_url, [p], **fields))
            n, worst = n + dn, max(worst, w)
    host_batch = post_photos(ref_url, photos, score_threshold=0.05)
    dn, w = compare(post_photos(url, photos, score_threshold=0.05), host_batch)
    n, worst = n + dn, max(worst, w)
    drained, after_s = drain(proc, url, photos, grace_s=60)
    served_log = (work / "server-a.log").read_text()
    assert "Application shutdown complete" in served_log, "no graceful shutdown"
    # the image built runtime/_jpegbands and its libjpeg came along into the runtime stage
    assert "JPEG decoding: a lone photo in two bands" in served_log, "the image decodes JPEGs whole"
    dn, w = compare(drained, host_batch)
    report.update(compared=n + dn, max_diff=max(worst, w), drain_answer_after_term_s=after_s)
    log(f"/detect: {n + dn} detections on {len(photos)} photos equal to the host's "
        f"(largest difference {report['max_diff']:.3g}), JPEGs decoded in two bands; SIGTERM mid-request "
        f"answered {after_s:.2f} s later, clean exit")
    cache_dir = [m for m in server["volumeMounts"] if m["mountPath"] == env["EXPORT_CACHE_DIR"]]
    assert cache_dir, "the image's EXPORT_CACHE_DIR is not one of the Deployment's volumes"
    cache_host = host_dirs[cache_dir[0]["name"]]
    report["cache_after_baked"] = files_under(cache_host)
    assert report["cache_after_baked"] == [], f"baked model served, yet the cache got {report['cache_after_baked']}"
    written = {m["mountPath"]: files_under(host_dirs[m["name"]]) for m in server["volumeMounts"] if not m.get("readOnly")}
    log("written while serving the baked model: " + "; ".join(f"{p}: {len(f)} files {f[:3]}" for p, f in written.items()))

    # A checkpoint of your own, as the README says: /models/<name> and FRCNN_MODEL naming it. It is
    # not the baked one, so the entrypoint runs `export --if-stale` into the cache volume. By default
    # the volume already holds this checkpoint's export (a restart with the volume kept): it must be
    # served as it is, not exported again. --export-on-start leaves the volume empty, and the export
    # runs in the container, as the image's user on the read-only root (minutes on 2 cores).
    (model_mount,) = [m for m in server["volumeMounts"] if env["FRCNN_MODEL"].startswith(m["mountPath"] + "/")]
    own = host_dirs[model_mount["name"]] / "my-model"  # what an init container of your own would copy
    own.mkdir()
    for f in ckpt.iterdir():
        shutil.copy(f, own)
    kept = cache_host / "model.onnx"
    if not args.export_on_start:
        shutil.copy(ref_onnx, kept)
        kept.chmod(0o644)
        before = kept.stat().st_mtime_ns
    t0 = time.perf_counter()
    proc = pod.start(work / "server-b.log", extra_env=[f"FRCNN_MODEL={model_mount['mountPath']}/my-model"])
    wait_until("HEALTHCHECK (own checkpoint)", lambda: pod.run(health["Test"][1:]).returncode == 0, deadline,
               proc=proc)
    wait_until("/ready (own checkpoint)", lambda: get_ok(url + "/ready"), 60, proc=proc)
    report["ready_own_s"] = time.perf_counter() - t0
    dn, w = compare(post_photos(url, photos[:2], score_threshold=0.05),
                    post_photos(ref_url, photos[:2], score_threshold=0.05))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) in (0, -signal.SIGTERM)
    text = (work / "server-b.log").read_text()
    served = f"{env['EXPORT_CACHE_DIR']}/model.onnx served by"
    assert "not the baked model" in text and served in text, text[-2000:]
    assert kept.is_file(), files_under(cache_host)
    if args.export_on_start:
        how = "exported in the container into the empty cache volume"
    else:
        assert kept.stat().st_mtime_ns == before, "a fresh export in the kept cache volume was exported again"
        how = "served from the kept cache volume without exporting again (--if-stale)"
    report["own_checkpoint"] = how
    log(f"own checkpoint {model_mount['mountPath']}/my-model: {how}; ready in {report['ready_own_s']:.1f} s, "
        f"{dn} detections equal (largest difference {w:.3g})")
    ref.send_signal(signal.SIGTERM)
    ref.wait(60)
    report["written_outside_mounts"] = [p for p in files_under(pod.upper)]
    assert report["written_outside_mounts"] == [], report["written_outside_mounts"]
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="localhost/frcnn:check")
    p.add_argument("--model", default="checkpoints/demo-tiny-shapes", help="checkpoint baked into the image")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "image"), help="where the base image tarball is kept")
    p.add_argument("--photos-dir", default=str(PHOTOS))
    p.add_argument("--photos", type=int, default=8, help="photos per request (the drain request too)")
    p.add_argument("--no-build", action="store_true", help="check the image as it is")
    p.add_argument("--export-on-start", action="store_true",
                   help="let the container export the mounted checkpoint itself (adds minutes)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--image-root", help=argparse.SUPPRESS)
    p.add_argument("--inspect", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--ref-onnx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        report = serve_checks(args)
        Path(args.report).write_text(json.dumps(report))
        return 0

    if os.getuid() != 0 or not (shutil.which("podman") and shutil.which("debootstrap")):
        log("needs root, podman and debootstrap (apt-get install podman debootstrap)")
        return 2
    figures = {}
    with tempfile.TemporaryDirectory(prefix="image-check-") as work:
        # the checkout's own export for the reference server, made while the image builds
        ref_onnx = Path(work) / "host-model.onnx"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRCNN_")}
        with (Path(work) / "host-export.log").open("w") as fh:
            ref_export = subprocess.Popen([sys.executable, "-m", "export", "onnx", "--checkpoint",
                                           str(ROOT / args.model), "--out", str(ref_onnx)],
                                          cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            if not args.no_build:
                log(f"base image {BASE_IMAGE}: {ensure_base(Path(args.cache))}")
                figures["build_s"] = build(args.image, Path(args.model).name, Path(args.cache) / "build.log")
                log(f"build time {figures['build_s']:.0f} s")
            rc = ref_export.wait(900)
        finally:
            if ref_export.poll() is None:
                ref_export.kill()
        if rc != 0:
            print((Path(work) / "host-export.log").read_text()[-3000:], file=sys.stderr)
            raise SystemExit("image-check: FAIL: the checkout's export for the reference server failed")
        info = json.loads(podman("image", "inspect", args.image))[0]
        figures["size_mb"] = info["Size"] / 1e6
        log(f"image {args.image}: {figures['size_mb']:.0f} MB")
        inspect = Path(work) / "inspect.json"
        # the Healthcheck sits beside Config in podman's inspect output; the pod wants both
        inspect.write_text(json.dumps({**info["Config"], "Healthcheck": info.get("Healthcheck")
                                       or info["Config"].get("Healthcheck")}))
        image_root = podman("image", "mount", args.image)
        report_file = Path(work) / "report.json"
        try:
            rc = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--",
                                 sys.executable, __file__, "--inside", "--image-root", image_root,
                                 "--inspect", str(inspect), "--work", work, "--report", str(report_file),
                                 "--model", args.model, "--photos-dir", args.photos_dir,
                                 "--photos", str(args.photos), "--ref-onnx", str(ref_onnx),
                                 *(["--export-on-start"] if args.export_on_start else [])]).returncode
        finally:
            podman("image", "unmount", args.image)
        if rc != 0:
            for f in sorted(Path(work).glob("*.log")):
                print(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text().splitlines()[-25:]), file=sys.stderr)
            log("FAIL")
            return 1
        report = json.loads(report_file.read_text())
    build_s = f"{figures['build_s']:.0f} s" if "build_s" in figures else "not built (--no-build)"
    log(f"PASS: build {build_s}, image {figures['size_mb']:.0f} MB, ready in {report['ready_s']:.1f} s "
        f"(healthy {report['healthy_s']:.1f} s; own checkpoint {report['ready_own_s']:.1f} s, "
        f"{report['own_checkpoint']}), {report['compared']} detections equal to the host's (largest difference "
        f"{report['max_diff']:.3g}), drained a request in flight at SIGTERM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
