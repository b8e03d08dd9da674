"""/openapi.json tells the truth: checked by hand (query parameters, required parts, security only
with an API key) and by `schemathesis run` against the live server on loopback, with its default
checks (response schemas, status codes, content types, schema-valid data accepted, invalid data
rejected, ...), bounded in examples and time.

schemathesis_hooks.py makes positive /detect cases carry decodable images (see there why).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from srv_helpers import CLASS_NAMES

HERE = Path(__file__).resolve().parent


def _detect(spec: dict) -> dict:
    return spec["paths"]["/detect"]["post"]


def test_detect_documents_query_parts_and_limits(live):
    spec = httpx.get(live + "/openapi.json", timeout=30).json()
    op = _detect(spec)
    query = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    assert set(query) == {"score_threshold", "max_detections", "classes"}
    assert query["score_threshold"]["schema"]["minimum"] == 0 and query["score_threshold"]["schema"]["maximum"] == 1
    assert query["max_detections"]["schema"] == {**query["max_detections"]["schema"], "type": "integer",
                                                  "minimum": 1, "maximum": 1000}
    names = query["classes"]["schema"]["items"]["enum"]
    assert names == [*CLASS_NAMES[1:], *map(str, range(1, len(CLASS_NAMES)))]  # the loaded model's classes
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["images"]
    assert form["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    assert form["properties"]["images"]["maxItems"] == 4  # live's max_images_per_request
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["images"] and body["properties"]["images"]["maxItems"] == 4
    assert {"400", "408", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def test_security_listed_only_with_an_api_key(live, make_settings):
    spec = httpx.get(live + "/openapi.json", timeout=30).json()
    assert "securitySchemes" not in spec.get("components", {})
    assert not [p for p, item in spec["paths"].items() for op in item.values() if "security" in op]
    assert "401" not in _detect(spec)["responses"]

    from server import create_app

    keyed = create_app(make_settings(api_key="s3cret")).openapi()  # the schema alone: no model needed
    assert keyed["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert _detect(keyed)["security"] == [{"APIKeyHeader": []}] and "401" in _detect(keyed)["responses"]


def test_schemathesis_run_is_clean(live, tmp_path):
    pytest.importorskip("schemathesis")
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [str(exe), "--config-file", str(HERE / "schemathesis.toml"), "run", f"{live}/openapi.json",
           "--max-examples", "12", "--seed", "20261201", "--workers", "1", "--request-timeout", "60",
           "--phases", "examples,coverage,fuzzing",  # stateful: no links between these operations matter
           "--no-color", "--max-failures", "5"]  # every route, the Open Inference Protocol's included
    # cwd: schemathesis writes its cache (.schemathesis/) there, not into the repository
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]

