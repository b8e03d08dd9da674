"""Schemathesis hooks for test_openapi_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

A positive POST /detect case is one the schema accepts; two of the server's rules are beyond what
JSON Schema can state: the bytes must decode as an image, and `names` has one entry per image. For
positive cases only, this puts a real JPEG in every image slot and gives `names` one entry per
image; everything else schemathesis generated (options, classes, counts, query) is kept. Positive
OIP infer cases likewise get real JPEGs (see _infer).
Negative cases are left alone.
"""

from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 140, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg()
JPEG_B64 = base64.b64encode(JPEG).decode()


def _infer(case):
    """A positive OIP infer case: real JPEGs in the BYTES tensor, its shape [B] matching the data, and a
    class filter (free text in the schema) replaced by a class the model has."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return case
    for tensor in body["inputs"]:
        if isinstance(tensor, dict) and isinstance(tensor.get("data"), list):
            n = len(tensor["data"])
            tensor["data"] = [JPEG_B64] * n
            tensor["shape"] = [n] if len(tensor.get("shape") or [1]) < 2 else [n, 1]
    if isinstance(body.get("parameters"), dict) and "classes" in body["parameters"]:
        body["parameters"]["classes"] = "1"
    return case


@schemathesis.hook
def map_case(ctx, case):
    meta = case.meta
    if case.method.upper() != "POST" or meta is None or not meta.generation.mode.is_positive:
        return case
    if case.path.endswith("/infer"):
        return _infer(case)
    if case.path != "/detect":
        return case
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        return case
    if (case.media_type or "").startswith("multipart/"):
        body["images"] = [JPEG] * len(body["images"])
    else:
        n = len(body["images"])
        body["images"] = [JPEG_B64] * n
        if isinstance(body.get("names"), list):
            body["names"] = [*body["names"], *(f"image-{i}" for i in range(n))][:n]
    return case
