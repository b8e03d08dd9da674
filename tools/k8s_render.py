"""Render the Kubernetes manifests under deploy/k8s (kustomize base and overlays) to plain YAML.

    python tools/k8s_render.py deploy/k8s/overlays/gpu            # multi-document YAML on stdout
    python tools/k8s_render.py --all --out-dir out/k8s            # base.yaml, gpu.yaml, ...

Uses `kustomize build` or `kubectl kustomize` when either is on PATH (the reference
implementation), otherwise a small built-in renderer that covers what deploy/k8s uses and fails
loudly on anything else:

    kustomization keys: resources (files or directories), components, configMapGenerator
    (envs, literals, behavior create|merge|replace, options.disableNameSuffixHash), patches
    (strategic merge, from `path` or inline `patch`), images (newName, newTag, digest)

The tests check that both renderers give the same objects where kustomize is available.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"

KUSTOMIZE_API = "kustomize.config.k8s.io/"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "patches", "images"}

# Strategic-merge keys of the list fields deploy/k8s patches (from the Kubernetes API's
# x-kubernetes-patch-merge-key); any other list is replaced whole, as in kustomize.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}

# kustomize's default ("legacy") output order: these kinds first, in this order, the rest after
# (sorted by kind, then name).
KIND_ORDER = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
              "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
              "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
              "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget"]


class RenderError(Exception):
    pass


# --- built-in renderer ----------------------------------------------------------------------------


def _load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(directory: Path) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{path}: the built-in renderer does not support {sorted(unknown)}; "
                          "install kustomize or kubectl")
    return k


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def strategic_merge(base: object, patch: object, field: str | None = None) -> object:
    """Merge `patch` into `base` the way a strategic-merge patch does, for the fields in MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)                   # `key: null` deletes, as in a merge patch
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # kustomize's order: the patch's items first (merged with their base item), then the rest
        mk = MERGE_KEYS[field]
        by_key = {b.get(mk): b for b in base}
        patched = [strategic_merge(by_key[item.get(mk)], item) if item.get(mk) in by_key
                   else copy.deepcopy(item) for item in patch]
        keys = {item.get(mk) for item in patch}
        return patched + [copy.deepcopy(b) for b in base if b.get(mk) not in keys]
    return copy.deepcopy(patch)


def _go_json(obj: object) -> str:
    """json.Marshal of Go (sorted keys, no spaces, HTML-safe escapes): input of kustomize's name hash."""
    s = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def configmap_hash(data: dict[str, str]) -> str:
    """The 10-character suffix kustomize appends to a generated ConfigMap's name."""
    # kustomize hashes kind, data and an empty name, and swaps some characters to avoid words
    digest = hashlib.sha256(_go_json({"data": data, "kind": "ConfigMap", "name": ""}).encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise RenderError(f"{path}:{n}: expected KEY=VALUE")
        k, v = line.split("=", 1)
        out[k] = v
    return out


def _generator_data(directory: Path, gen: dict) -> dict[str, str]:
    unknown = set(gen) - {"name", "envs", "literals", "behavior", "options"}
    if unknown:
        raise RenderError(f"{directory}: configMapGenerator {gen.get('name')}: unsupported {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(_parse_env_file(directory / env))
    for lit in gen.get("literals", []):
        k, v = lit.split("=", 1)
        data[k] = v
    return data


def _apply_layer(directory: Path, k: dict, objs: list[dict], gens: dict[str, dict]) -> list[dict]:
    """Apply one kustomization's own generators, patches and image edits to the accumulated objects."""
    for gen in k.get("configMapGenerator", []):
        name, behavior = gen["name"], gen.get("behavior", "create")
        data = _generator_data(directory, gen)
        options = gen.get("options", {})
        if behavior == "create":
            if name in gens:
                raise RenderError(f"{directory}: ConfigMap {name} generated twice")
            gens[name] = {"data": data, "hash": not options.get("disableNameSuffixHash", False)}
        elif behavior in ("merge", "replace"):
            if name not in gens:
                raise RenderError(f"{directory}: ConfigMap {name} to {behavior} does not exist")
            gens[name]["data"] = {**gens[name]["data"], **data} if behavior == "merge" else data
        else:
            raise RenderError(f"{directory}: unknown behavior {behavior}")

    for p in k.get("patches", []):
        if set(p) - {"path", "patch"}:
            raise RenderError(f"{directory}: only strategic-merge patches without target are supported")
        docs = _load_yaml_docs(directory / p["path"]) if "path" in p else list(yaml.safe_load_all(p["patch"]))
        for doc in docs:
            idx = next((i for i, o in enumerate(objs) if _key(o) == _key(doc)), None)
            if idx is None:
                raise RenderError(f"{directory}: patch target {_key(doc)} not found")
            objs[idx] = strategic_merge(objs[idx], doc)

    for img in k.get("images", []):
        for obj in objs:
            for c in _pod_containers(obj):
                name, _, tag = c["image"].partition("@")[0].partition(":")
                if name != img["name"]:
                    continue
                new = img.get("newName", name)
                if "digest" in img:
                    c["image"] = f"{new}@{img['digest']}"
                else:
                    new_tag = img.get("newTag", tag)
                    c["image"] = f"{new}:{new_tag}" if new_tag else new
    return objs


def _pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def _accumulate(directory: Path, gens: dict[str, dict]) -> list[dict]:
    k = _kustomization(directory)
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = directory / res
        objs.extend(_accumulate(path, gens) if path.is_dir() else _load_yaml_docs(path))
    for comp in k.get("components", []):
        ck = _kustomization(directory / comp)
        if ck.get("kind") != "Component":
            raise RenderError(f"{directory / comp}: not a kind: Component")
        for res in ck.get("resources", []):
            objs.extend(_load_yaml_docs(directory / comp / res))
        objs = _apply_layer(directory / comp, ck, objs, gens)
    return _apply_layer(directory, k, objs, gens)


def _rename_configmap_refs(obj: dict, names: dict[str, str]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for c in _pod_containers(obj):
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef")
            if ref and ref.get("name") in names:
                ref["name"] = names[ref["name"]]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref.get("name") in names:
                ref["name"] = names[ref["name"]]
    for v in spec.get("volumes", []):
        ref = v.get("configMap")
        if ref and ref.get("name") in names:
            ref["name"] = names[ref["name"]]


def _sort_key(obj: dict) -> tuple:
    kind, name = _key(obj)
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return rank, kind if rank == len(KIND_ORDER) else "", name


def render_builtin(directory: Path) -> list[dict]:
    """Build the kustomization in `directory` into a list of Kubernetes objects."""
    gens: dict[str, dict] = {}
    objs = _accumulate(Path(directory), gens)
    names = {}
    for name, g in gens.items():
        full = f"{name}-{configmap_hash(g['data'])}" if g["hash"] else name
        names[name] = full
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": full}, "data": g["data"]})
    for obj in objs:
        _rename_configmap_refs(obj, names)
    return sorted(objs, key=_sort_key)


# --- front end ------------------------------------------------------------------------------------


def external_command() -> list[str] | None:
    """The reference kustomize on this machine, if any."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_external(directory: Path, cmd: list[str]) -> list[dict]:
    out = subprocess.run([*cmd, str(directory)], check=True, capture_output=True, text=True, timeout=120)
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def render(directory: Path, engine: str = "auto") -> list[dict]:
    """engine: "auto" (kustomize/kubectl when present, else built-in), "builtin" or "external"."""
    cmd = external_command() if engine in ("auto", "external") else None
    if engine == "external" and cmd is None:
        raise RenderError("neither kustomize nor kubectl is on PATH")
    return render_external(directory, cmd) if cmd else render_builtin(directory)


def kustomization_dirs(root: Path = K8S_DIR) -> dict[str, Path]:
    """Every buildable kustomization (base and overlays, not components), by short name."""
    out = {}
    for path in sorted(root.rglob("kustomization.yaml")):
        k = yaml.safe_load(path.read_text()) or {}
        if k.get("kind", "Kustomization") == "Kustomization":
            out[path.parent.name] = path.parent
    return out


def to_yaml(objs: list[dict]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=True, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", type=Path, help="kustomization directory (base or an overlay)")
    ap.add_argument("--all", action="store_true", help="render base and every overlay")
    ap.add_argument("--out-dir", type=Path, help="with --all: write NAME.yaml files here")
    ap.add_argument("--engine", choices=["auto", "builtin", "external"], default="auto")
    args = ap.parse_args(argv)
    if args.all == (args.dir is not None):
        ap.error("give a directory or --all")
    try:
        if args.dir is not None:
            sys.stdout.write(to_yaml(render(args.dir, args.engine)))
            return 0
        for name, directory in kustomization_dirs().items():
            text = to_yaml(render(directory, args.engine))
            if args.out_dir:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                (args.out_dir / f"{name}.yaml").write_text(text)
                print(f"wrote {args.out_dir / f'{name}.yaml'}")
            else:
                sys.stdout.write(f"---\n# {name}: {directory.relative_to(ROOT)}\n{text}")
    except (RenderError, subprocess.CalledProcessError) as e:
        print(f"k8s_render: {getattr(e, 'stderr', None) or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
