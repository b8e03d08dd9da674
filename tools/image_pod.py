"""The built image run the way a pod runs it, without `podman run` (this sandbox refuses the OCI
runtime's setrlimit): the image's filesystem read-only under an overlay, the Deployment's volumes
as the only writable paths, every process started by chroot as the image's USER with exactly the
image's Env and WorkingDir (tools/image_check.py's step 3).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from image_build import ROOT, sh

DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"


class Pod:
    """The image's filesystem read-only, the Deployment's volumes, processes as the image's user."""

    def __init__(self, image_root: Path, config: dict, work: Path):
        self.config, self.work = config, work
        self.user = config["User"]
        self.uid, self.gid = (int(x) for x in self.user.split(":"))
        self.root = work / "root"
        upper, wd = work / "upper", work / "ovl-work"
        for d in (self.root, upper, wd):
            d.mkdir()
        # an overlay, so mount points the image lacks (/model-volume) can be made before it goes
        # read-only, as a container runtime makes them; upper/ shows anything else that was written
        sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={image_root},upperdir={upper},workdir={wd}",
           str(self.root))
        self.upper = upper

    def prepare_mountpoints(self, paths: list[str]) -> None:
        for p in paths:
            (self.root / p.lstrip("/")).mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "remount,ro", str(self.root))
        sh("mount", "-t", "proc", "proc", str(self.root / "proc"))
        for sys_dir in ("dev", "sys"):
            sh("mount", "--rbind", f"/{sys_dir}", str(self.root / sys_dir))

    def mount(self, host_dir: Path, path: str, read_only: bool = False) -> None:
        target = str(self.root / path.lstrip("/"))
        sh("mount", "--bind", str(host_dir), target)
        if read_only:
            sh("mount", "-o", "remount,bind,ro", target)

    def unmount(self, path: str) -> None:
        sh("umount", str(self.root / path.lstrip("/")))

    def env(self) -> list[str]:
        env = list(self.config.get("Env") or [])
        if not any(e.startswith("HOME=") for e in env):  # Docker sets HOME from the image's passwd
            home = "/"
            for line in (self.root / "etc" / "passwd").read_text().splitlines():
                f = line.split(":")
                if f[2] == str(self.uid):
                    home = f[5]
            env.append(f"HOME={home}")
        return env

    def argv(self, cmd: list[str], extra_env: list[str] = ()) -> list[str]:
        return ["chroot", f"--userspec={self.user}", f"--groups={self.gid}", str(self.root), "/usr/bin/env", "-i",
                f"--chdir={self.config.get('WorkingDir') or '/'}", *self.env(), *extra_env, *cmd]

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, **kw)

    def start(self, logfile: Path, extra_env: list[str] = ()) -> subprocess.Popen:
        """ENTRYPOINT + CMD; extra_env as `docker run -e` would add it (after the image's Env: it wins)."""
        cmd = list(self.config.get("Entrypoint") or []) + list(self.config.get("Cmd") or [])
        fh = logfile.open("w")
        return subprocess.Popen(self.argv(cmd, extra_env), stdout=fh, stderr=subprocess.STDOUT)


def deployment() -> tuple[dict, dict, dict]:
    """(pod spec, server container, init container) of the base Deployment."""
    (dep,) = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d and d.get("kind") == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (server,) = [c for c in spec["containers"] if c["name"] == "server"]
    (init,) = spec["initContainers"]
    return spec, server, init
