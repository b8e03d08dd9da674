"""tools/k8s_render.py: the built-in kustomize subset, checked by hand and against kustomize."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from deploy_support import DEPLOY, ROOT


def test_strategic_merge_by_key_patch_items_first(renderer):
    base = {"spec": {"containers": [
        {"name": "a", "image": "i", "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}],
         "args": ["x", "y"], "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
        {"name": "b", "image": "j"},
    ]}}
    patch = {"spec": {"containers": [
        {"name": "c", "image": "k"},
        {"name": "a", "env": [{"name": "N", "value": "n"}, {"name": "E2", "value": "z"}], "args": ["q"],
         "resources": {"limits": {"cpu": "2", "nvidia.com/gpu": 1}}},
    ]}}
    out = renderer.strategic_merge(base, patch)
    # kustomize's order: the patch's items (merged), then base items the patch does not name
    assert [c["name"] for c in out["spec"]["containers"]] == ["c", "a", "b"]
    a = out["spec"]["containers"][1]
    assert a["env"] == [{"name": "N", "value": "n"}, {"name": "E2", "value": "z"}, {"name": "E1", "value": "1"}]
    assert a["args"] == ["q"]  # a list without a merge key is replaced whole
    assert a["resources"]["limits"] == {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": 1}
    assert a["image"] == "i"
    assert base["spec"]["containers"][0]["args"] == ["x", "y"]  # inputs untouched


def test_strategic_merge_null_deletes(renderer):
    assert renderer.strategic_merge({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None}}) == {"a": 1, "b": {"d": 3}}


def test_configmap_hash_matches_kustomize(renderer):
    # name suffix kustomize v5.5 gives these literals (HTML characters and non-ASCII included)
    data = {"FRCNN_PORT": "8000", "FRCNN_CORS_ORIGINS": "https://a.example,https://b.example&c<d>", "NOTE": "café"}
    assert renderer.configmap_hash(data) == "h94h6cbmt9"


def test_unsupported_kustomization_fails_loudly(renderer, tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(renderer.RenderError, match="namePrefix"):
        renderer.render_builtin(tmp_path)


def test_patch_of_a_missing_object_fails(renderer, tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches:\n  - path: p.yaml\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: nope\n")
    with pytest.raises(renderer.RenderError, match="not found"):
        renderer.render_builtin(tmp_path)


def test_images_retag_every_container(renderer, rendered):
    spec = next(o for o in rendered["gpu"] if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["initContainers"] + spec["containers"]} == {"frcnn-gpu:latest"}


@pytest.mark.skipif(shutil.which("kustomize") is None and shutil.which("kubectl") is None,
                    reason="neither kustomize nor kubectl on PATH: nothing to compare the built-in renderer with")
def test_builtin_renderer_agrees_with_kustomize(renderer):
    cmd = renderer.external_command()
    for name, directory in renderer.kustomization_dirs().items():
        ours = renderer.render_builtin(directory)
        theirs = renderer.render_external(directory, cmd)
        # same objects, same order (kustomize's legacy kind order)
        assert [(o["kind"], o["metadata"]["name"]) for o in ours] == \
            [(o["kind"], o["metadata"]["name"]) for o in theirs], name
        assert ours == theirs, name


def test_cli_writes_every_render(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "k8s_render.py"), "--all",
                          "--engine", "builtin", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{d.name}.yaml" for d in (DEPLOY / "k8s").rglob("*")
                           if (d / "kustomization.yaml").is_file()
                           and yaml.safe_load((d / "kustomization.yaml").read_text()).get("kind") != "Component")
    docs = [d for d in yaml.safe_load_all((tmp_path / "base.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
