"""Plain helpers of the deploy tests (fixtures are in conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_renderer() -> ModuleType:
    """tools/k8s_render.py is a script, not a package: load it by path."""
    name = "frcnn_tools_k8s_render"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "k8s_render.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


# --- Dockerfiles ----------------------------------------------------------------------------------


class Dockerfile:
    """The instructions of a Dockerfile, enough to check it against the server: stages, ARG defaults,
    ENV of the final stage (ARGs substituted), CMD, ENTRYPOINT, EXPOSE, USER, HEALTHCHECK, COPY."""

    def __init__(self, path: Path):
        self.path = path
        self.instructions: list[tuple[str, str]] = []  # (INSTRUCTION, arguments)
        logical = ""
        for line in path.read_text().splitlines():
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            op, _, rest = logical.strip().partition(" ")
            self.instructions.append((op.upper(), rest.strip()))
            logical = ""

    def all(self, op: str) -> list[str]:
        return [rest for o, rest in self.instructions if o == op]

    def final_stage(self) -> list[tuple[str, str]]:
        last = max(i for i, (o, _) in enumerate(self.instructions) if o == "FROM")
        return self.instructions[last:]

    def args(self) -> dict[str, str]:
        out = {}
        for rest in self.all("ARG"):
            name, _, default = rest.partition("=")
            out[name] = default
        return out

    def env(self) -> dict[str, str]:
        """ENV of the final stage, with ARG defaults and earlier ENV values substituted."""
        values = dict(self.args())
        env: dict[str, str] = {}
        for op, rest in self.final_stage():
            if op != "ENV":
                continue
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                v = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), v)
                env[k] = values[k] = v
        return env

    def exec_form(self, op: str) -> list[str] | None:
        found = [rest for o, rest in self.final_stage() if o == op]
        return json.loads(found[-1]) if found else None
