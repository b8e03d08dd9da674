"""Open Inference Protocol v2 (server/oip.py) against the live app, driven by Triton's own client
(`tritonclient.http`, unmodified, from the registry) and by hand-built requests where the client
would refuse to send what we test."""

from __future__ import annotations

import base64
import io
import json
import struct

import httpx
import numpy as np
import pytest
from PIL import Image
from srv_helpers import CLASS_NAMES, jpeg_bytes, serve

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test dependency (make install)")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _client(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120.0)


def _images_input(blobs: list[bytes], *, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("images", [len(blobs)], "BYTES")
    data = blobs if binary else [base64.b64encode(b) for b in blobs]  # JSON carries files as base64 text
    inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return inp


@pytest.fixture(scope="module")
def model(live) -> dict:
    return httpx.get(f"{live}/model", timeout=30).json()


def test_health_and_server_metadata(live):
    client = _client(live)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "frcnn" and {"binary_tensor_data", "parameters"} <= set(meta["extensions"])


def test_model_metadata_is_what_get_model_reports(live, model):
    client = _client(live)
    name, version = model["name"], model["version"]
    assert client.is_model_ready(name) and client.is_model_ready(name, version)
    assert not client.is_model_ready(name, "999") and not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(name, version)
    assert meta == client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == [version] and meta["platform"] == "frcnn_torch"
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("boxes", "FP32", [-1, -1, 4]), ("scores", "FP32", [-1, -1]), ("labels", "INT64", [-1, -1]),
        ("num_detections", "INT64", [-1])]
    p = meta["parameters"]
    assert p["classes"] == model["classes"] == CLASS_NAMES
    assert p["precision"] == model["precision"] == "fp32"
    assert {k: p["preprocessing"][k] for k in model["input"]} == model["input"]
    assert p["preprocessing"]["min_size"] == 320 and p["max_images_per_request"] == 4
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert e.value.status() == "404" and f"serves {name!r}" in e.value.message()


def test_two_photos_in_one_infer_call_equal_detect(live, model, coco_jpegs):
    """The issue's must-show: binary data on both ways, two photos of different sizes, one call."""
    photos = [coco_jpegs[0], coco_jpegs[3]]
    blobs = [p.read_bytes() for p in photos]
    assert Image.open(io.BytesIO(blobs[0])).size != Image.open(io.BytesIO(blobs[1])).size
    k = 20
    result = _client(live).infer(model["name"], [_images_input(blobs)], model_version=model["version"],
                                 parameters={"max_detections": k, "score_threshold": 0.05})
    assert result.get_response()["model_name"] == model["name"]
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    labels, counts = result.as_numpy("labels"), result.as_numpy("num_detections")
    assert boxes.shape == (2, k, 4) and boxes.dtype == np.float32 and scores.shape == (2, k)
    assert labels.dtype == np.int64 and counts.dtype == np.int64 and counts.shape == (2,)
    detect = httpx.post(f"{live}/detect", files=[("images", (p.name, b, "image/jpeg")) for p, b in zip(photos, blobs)],
                        data={"max_detections": str(k), "score_threshold": "0.05"}, timeout=120).json()["results"]
    for i, res in enumerate(detect):
        n = len(res["detections"])
        assert counts[i] == n > 0
        # /detect rounds boxes to 0.01 px and scores to 1e-4 for JSON; OIP sends the float32 values
        np.testing.assert_allclose(boxes[i, :n], [d["box"] for d in res["detections"]], atol=0.0051)
        np.testing.assert_allclose(scores[i, :n], [d["score"] for d in res["detections"]], atol=5.1e-5)
        assert labels[i, :n].tolist() == [d["label_id"] for d in res["detections"]]
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()  # padding rows
        assert (boxes[i, :n, 2] <= res["width"]).all() and (boxes[i, :n, 3] <= res["height"]).all()


def test_json_tensors_equal_binary_tensors(live, model, coco_jpegs):
    blobs = [coco_jpegs[1].read_bytes(), jpeg_bytes((200, 120))]
    client = _client(live)
    params = {"max_detections": 7, "classes": "circle,3"}
    binary = client.infer(model["name"], [_images_input(blobs)], parameters=params)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False)
               for n in ("num_detections", "labels", "scores", "boxes")]
    as_json = client.infer(model["name"], [_images_input(blobs, binary=False)], outputs=outputs, parameters=params)
    response = as_json.get_response()
    assert [o["name"] for o in response["outputs"]] == ["num_detections", "labels", "scores", "boxes"]
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    for name in ("boxes", "scores", "labels", "num_detections"):
        np.testing.assert_array_equal(as_json.as_numpy(name).reshape(binary.as_numpy(name).shape),
                                      binary.as_numpy(name))
    labels, counts = binary.as_numpy("labels"), binary.as_numpy("num_detections")
    assert binary.as_numpy("boxes").shape == (2, 7, 4) and counts.tolist() == [7, 7]
    assert set(labels.ravel().tolist()) <= {1, 3}  # the class filter applied


def test_gzip_request_body(live, model, coco_jpegs):
    blob = coco_jpegs[2].read_bytes()
    client = _client(live)
    plain = client.infer(model["name"], [_images_input([blob])], parameters={"max_detections": 5})
    zipped = client.infer(model["name"], [_images_input([blob])], parameters={"max_detections": 5},
                          request_compression_algorithm="gzip")
    np.testing.assert_array_equal(zipped.as_numpy("boxes"), plain.as_numpy("boxes"))


def _raw_infer(url: str, model: dict, header: dict, binary: bytes = b"", **headers) -> httpx.Response:
    head = json.dumps(header).encode()
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return httpx.post(f"{url}/v2/models/{model['name']}/infer", content=head + binary, headers=headers, timeout=60)


def _bytes_tensor(*blobs: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def test_hand_built_binary_request_with_shape_b_by_1(live, model):
    raw = _bytes_tensor(jpeg_bytes(), jpeg_bytes((160, 90)))
    r = _raw_infer(live, model, {"id": "req-7", "inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",
                                                            "parameters": {"binary_data_size": len(raw)}}],
                                 "outputs": [{"name": "num_detections"}], "parameters": {"max_detections": 3}}, raw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"  # no output asked for binary data
    assert r.json() == {"model_name": model["name"], "model_version": model["version"], "id": "req-7",
                        "outputs": [{"name": "num_detections", "datatype": "INT64", "shape": [2], "data": [3, 3]}]}


@pytest.mark.parametrize(("header", "binary", "status", "message"), [
    ({"inputs": [{"name": "images", "shape": [5], "datatype": "BYTES", "data": ["eA=="] * 5}]}, b"", 413,
     "5 images in one request; the limit is 4"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]}, b"", 415,
     "images[0]"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [""]}]}, b"", 400, "images[0]"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, b"", 400, "base64"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, b"", 400, "must be BYTES"),
    ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]}, b"", 400,
     "unknown input 'pixels'"),
    ({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": ["eA=="]}]}, b"", 400,
     "shape [2] but 1 elements"),
    ({"inputs": [{"name": "images", "shape": [0], "datatype": "BYTES", "data": []}]}, b"", 400, "no image"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                  "parameters": {"binary_data_size": 9}}]}, _bytes_tensor(b"x") + b"\x01\x02\x03\x04", 400,
     "runs past the binary data"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                  "parameters": {"binary_data_size": 99}}]}, _bytes_tensor(b"x"), 400, "does not fit"),
    ({"inputs": "images"}, b"", 400, "invalid inference request"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "parameters": {"score_threshold": 2}}, b"", 422, "score_threshold must be in [0, 1]"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "parameters": {"max_detections": "ten"}}, b"", 422, "max_detections must be an integer"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "parameters": {"classes": "zebra"}}, b"", 422, "unknown class 'zebra'"),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "outputs": [{"name": "masks"}]}, b"", 400, "unknown output 'masks'"),
])
def test_errors_in_the_protocol_shape(live, model, header, binary, status, message):
    r = _raw_infer(live, model, header, binary)
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and message in body["error"]


def test_corrupt_image_is_422_as_on_detect(live, model):
    truncated = jpeg_bytes()[:300]
    r = _raw_infer(live, model, {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                             "data": [base64.b64encode(truncated).decode()]}]})
    d = httpx.post(f"{live}/detect", files={"images": ("images[0]", truncated, "image/jpeg")}, timeout=60)
    assert r.status_code == d.status_code == 422 and r.json()["error"] == d.json()["detail"]


def test_malformed_header_and_body_limits(live, model):
    url = f"{live}/v2/models/{model['name']}/infer"
    for length in (b"\xb2", b"-1", b"1e1", b"3"):  # "²" passes str.isdigit(); 3 > the 2-byte body
        r = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": length}, timeout=30)
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], length
    r = httpx.post(url, content=b"[" * 100_000, timeout=30)
    assert r.status_code == 400 and list(r.json()) == ["error"]
    r = httpx.post(url, content=b"x" * 2_000_001, timeout=30)  # the live server's max_upload_bytes is 2,000,000
    assert r.status_code == 413 and "exceeds 2000000 bytes" in r.json()["error"]
    r = httpx.get(f"{live}/v2/models/{model['name']}/config", timeout=30)
    assert r.status_code == 404 and "not served" in r.json()["error"]
    r = httpx.put(f"{live}/v2/health/live", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "GET" and list(r.json()) == ["error"]
    r = httpx.get(url, timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_api_key_guards_metadata_and_infer_not_health(make_settings):
    with serve(make_settings(api_key="s3cret")) as (url, _):
        name = httpx.get(f"{url}/model", headers={"X-API-Key": "s3cret"}, timeout=30).json()["name"]
        client = _client(url)
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException) as e:
            client.infer(name, [_images_input([jpeg_bytes()])])
        assert e.value.status() == "401" and "X-API-Key" in e.value.message()
        result = client.infer(name, [_images_input([jpeg_bytes()])], headers={"X-API-Key": "s3cret"},
                              parameters={"max_detections": 2})
        assert result.as_numpy("num_detections").tolist() == [2]


def test_readme_example_runs_as_written(make_settings, tmp_path, capsys, monkeypatch):
    """The README's ten lines against the demo model, unchanged but for the address; its two files
    are two of the demo's sample images."""
    import re
    from pathlib import Path

    from server.settings import DEMO_CHECKPOINT

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Open Inference Protocol"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 11  # ten lines and a blank one
    with serve(make_settings(model=DEMO_CHECKPOINT, score_threshold=0.5)) as (url, _):
        samples = [httpx.get(f"{url}/sample.png", params={"index": i}, timeout=30).content for i in (0, 1)]
        (tmp_path / "photo.jpg").write_bytes(samples[0])
        (tmp_path / "other.png").write_bytes(samples[1])
        monkeypatch.chdir(tmp_path)
        ns: dict = {}
        exec(compile(code.replace("127.0.0.1:8000", url.removeprefix("http://")), "README.md", "exec"), ns)
        want = httpx.post(f"{url}/detect", timeout=120, data={"score_threshold": "0.5", "max_detections": "20"},
                          files=[("images", ("photo.jpg", samples[0])), ("images", ("other.png", samples[1]))]
                          ).json()["results"]
    assert capsys.readouterr().out.startswith("[[(")  # it printed (label, box) pairs per image
    assert ns["n"].tolist() == [len(r["detections"]) for r in want] and min(ns["n"]) >= 3
    for i, r in enumerate(want):
        assert ns["labels"][i, :ns["n"][i]].tolist() == [d["label_id"] for d in r["detections"]]
        np.testing.assert_allclose(ns["boxes"][i, :ns["n"][i]], [d["box"] for d in r["detections"]], atol=0.0051)
