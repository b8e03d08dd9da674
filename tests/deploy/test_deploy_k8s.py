"""Kubernetes manifests: they parse, validate against the Kubernetes schemas, and agree with the
server (settings names, port, probe routes, metric names) and with each other (selectors, names)."""

from __future__ import annotations

import copy
import os
import re
import shutil

import kubernetes_validate
import pytest
import yaml
from deploy_support import DEPLOY, Dockerfile, env_file, load_all, yaml_files

# Oldest Kubernetes minor still commonly run, and the newest the validator ships schemas for.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
KUSTOMIZE_API = "kustomize.config.k8s.io/"


def k8s_objects(docs: list[dict]) -> list[dict]:
    """Kubernetes API objects among parsed YAML documents (not kustomize's own files, not Helm values)."""
    return [d for d in docs if "apiVersion" in d and "kind" in d and not d["apiVersion"].startswith(KUSTOMIZE_API)]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]


def server_container(deploy: dict) -> dict:
    (c,) = [c for c in pod_spec(deploy)["containers"] if c["name"] == "server"]
    return c


def configmap_data(objs: list[dict], deploy: dict) -> dict[str, str]:
    """Environment the server container gets from ConfigMaps (envFrom), resolved by name."""
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(objs, "ConfigMap")}
    data: dict[str, str] = {}
    for ef in server_container(deploy).get("envFrom", []):
        name = ef["configMapRef"]["name"]
        assert name in cms, f"envFrom names ConfigMap {name}, which the render does not contain"
        data.update(cms[name])
    return data


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return p


# --- every YAML file ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_plain_manifests_validate(path):
    """Files as written (base resources, patches are partial and skipped) against the schemas."""
    for obj in k8s_objects(load_all(path)):
        if path.parent.name != "base":
            continue  # overlay and component files are partial patches; their renders are checked below
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(obj, v, strict=True)


def test_renders_cover_base_and_gpu(rendered):
    assert {"base", "gpu"} <= set(rendered)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate(rendered, version):
    for name, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds, name
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_validator_catches_a_misspelt_probe(rendered):
    """The schema check is strict: an unknown field (a typo) fails, so the checks above can fail."""
    deploy = copy.deepcopy(one(rendered["base"], "Deployment"))
    server_container(deploy)["readinessProb"] = server_container(deploy).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)


# --- agreement with the server -------------------------------------------------------------------


@pytest.mark.parametrize("env", sorted(DEPLOY.rglob("settings.env")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_settings_env_names_are_settings_fields(env, settings_fields):
    for key in env_file(env):
        assert key.startswith("FRCNN_"), f"{env}: {key} is not a server setting"
        assert key[len("FRCNN_"):].lower() in settings_fields, f"{env}: {key} is not a field of server Settings"


def test_rendered_settings_are_valid_settings(rendered, settings_cls, monkeypatch):
    """Each render's environment (ConfigMap + literal env) builds a valid Settings: names and values."""
    fields = settings_cls.model_fields
    for name, objs in rendered.items():
        deploy = one(objs, "Deployment")
        env = configmap_data(objs, deploy)
        for e in server_container(deploy).get("env", []):
            if e["name"].startswith("FRCNN_"):
                assert e["name"][6:].lower() in fields, f"{name}: {e['name']} is not a field of Settings"
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "resourceFieldRef" in e.get("valueFrom", {}):
                    env[e["name"]] = "2"  # what the kubelet writes: whole cores of the limit
        for k in [k for k in os.environ if k.startswith("FRCNN_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = settings_cls(_env_file=None)
        assert s.host == "0.0.0.0", f"{name}: the server must listen on all interfaces in a pod"
        assert str(s.model).startswith("/models/"), f"{name}: FRCNN_MODEL must be on the model volume"


def test_ports_match_the_server(rendered, settings_cls, monkeypatch):
    for name, objs in rendered.items():
        deploy = one(objs, "Deployment")
        env = configmap_data(objs, deploy)
        port = int(env.get("FRCNN_PORT", settings_cls.model_fields["port"].default))
        c = server_container(deploy)
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port], name
        ann = deploy["spec"]["template"]["metadata"]["annotations"]
        assert int(ann["prometheus.io/port"]) == port, name
        svc = one(objs, "Service")
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], name


def test_probes_hit_the_server_routes(rendered, server_routes):
    for name, objs in rendered.items():
        c = server_container(one(objs, "Deployment"))
        expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
        for probe, path in expected.items():
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe}"
            assert "GET" in server_routes[get["path"]], f"{name}: {probe} path is not a GET route of the app"
            assert named_port(c, get["port"]) == c["ports"][0]["containerPort"]
        ann = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/path"] in server_routes, f"{name}: metrics path is not a route"


def test_queue_metric_exists_in_the_server(rendered, settings_cls):
    """The HPA's custom metric and the prometheus-adapter rule name a gauge the server exports."""
    from server.metrics import Metrics

    metrics = Metrics(settings_cls().max_batch_size)
    exported = {fam.name for attr in vars(metrics).values() if hasattr(attr, "collect") for fam in attr.collect()}
    hpa = one(rendered["gpu"], "HorizontalPodAutoscaler")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == ["frcnn_queue_depth"]
    assert set(pods) <= exported
    values = load_all(DEPLOY / "k8s" / "components" / "queue-autoscaling" / "prometheus-adapter-values.yaml")[0]
    for rule in values["rules"]["custom"]:
        assert rule["name"]["as"] in pods
        assert re.match(r"^(\w+)", rule["seriesQuery"]).group(1) in exported


# --- internal consistency ------------------------------------------------------------------------


def test_selectors_and_references_agree(rendered):
    for name, objs in rendered.items():
        deploy = one(objs, "Deployment")
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        selector = deploy["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
        assert one(objs, "Service")["spec"]["selector"] == selector, name
        assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector, name
        ref = one(objs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", deploy["metadata"]["name"]), name
        hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"], name


def test_every_container_has_requests_and_limits(rendered):
    for name, objs in rendered.items():
        spec = pod_spec(one(objs, "Deployment"))
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c["resources"]
            for kind in ("cpu", "memory"):
                assert kind in res["requests"] and kind in res["limits"], f"{name}: {c['name']} {kind}"
        res = server_container(one(objs, "Deployment"))["resources"]
        # Guaranteed QoS: exclusive cores under the static CPU manager, no eviction before others
        assert res["requests"] == res["limits"], f"{name}: server requests != limits"


def test_volumes_match_settings(rendered):
    """The model volume holds FRCNN_MODEL, the init container fills it, the cache is writable."""
    for name, objs in rendered.items():
        deploy = one(objs, "Deployment")
        env = configmap_data(objs, deploy)
        c = server_container(deploy)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        model_mount = [p for p in mounts if env["FRCNN_MODEL"].startswith(p + "/")]
        assert model_mount and mounts[model_mount[0]].get("readOnly"), f"{name}: model volume"
        vol = mounts[model_mount[0]]["name"]
        inits = [i for i in pod_spec(deploy).get("initContainers", [])
                 if any(m["name"] == vol for m in i.get("volumeMounts", []))]
        assert inits, f"{name}: nothing fills the model volume"
        # the entrypoints' export cache (an image ENV, not a server setting) is a writable volume
        cache = Dockerfile(DEPLOY / ("Dockerfile.gpu" if name == "gpu" else "Dockerfile")).env()["EXPORT_CACHE_DIR"]
        assert cache in mounts and not mounts[cache].get("readOnly"), f"{name}: export cache not writable"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in mounts
        assert pod_spec(deploy)["securityContext"]["runAsNonRoot"] is True


def test_gpu_overlay_asks_for_one_gpu_per_replica(rendered):
    base = server_container(one(rendered["base"], "Deployment"))
    gpu_deploy = one(rendered["gpu"], "Deployment")
    gpu = server_container(gpu_deploy)
    assert "nvidia.com/gpu" not in base["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].split(":")[0] == "frcnn-gpu"
    tolerations = pod_spec(gpu_deploy)["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # engine build on the first start: the startup probe allows much longer than on CPU
    assert gpu["startupProbe"]["failureThreshold"] > base["startupProbe"]["failureThreshold"]
    gpu_env = configmap_data(rendered["gpu"], gpu_deploy)
    assert int(gpu_env["FRCNN_MAX_BATCH_SIZE"]) > int(configmap_data(rendered["base"], one(rendered["base"], "Deployment"))["FRCNN_MAX_BATCH_SIZE"])


def test_settings_change_renames_the_configmap(renderer, tmp_path):
    """Editing settings.env changes the ConfigMap's name, so the Deployment rolls its pods."""
    src = DEPLOY / "k8s"
    dst = tmp_path / "k8s"
    shutil.copytree(src, dst)
    before = one(renderer.render_builtin(dst / "base"), "ConfigMap")["metadata"]["name"]
    (dst / "base" / "settings.env").write_text((src / "base" / "settings.env").read_text() + "FRCNN_QUEUE_SIZE=33\n")
    objs = renderer.render_builtin(dst / "base")
    after = one(objs, "ConfigMap")["metadata"]["name"]
    assert before != after and after.startswith("frcnn-settings-")
    assert server_container(one(objs, "Deployment"))["envFrom"][0]["configMapRef"]["name"] == after


def test_kustomize_files_list_existing_files():
    for k in DEPLOY.rglob("kustomization.yaml"):
        doc = yaml.safe_load(k.read_text())
        for res in doc.get("resources", []) + doc.get("components", []):
            assert (k.parent / res).exists(), f"{k}: {res}"
        for p in doc.get("patches", []):
            assert (k.parent / p["path"]).is_file(), f"{k}: {p['path']}"
        for g in doc.get("configMapGenerator", []):
            for e in g.get("envs", []):
                assert (k.parent / e).is_file(), f"{k}: {e}"
