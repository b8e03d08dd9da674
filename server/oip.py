"""Open Inference Protocol v2 (KServe v2, Triton's HTTP API) beside /detect, on the same engine
and micro-batcher (server/jobs.py), so Triton's own client (`tritonclient.http`) works unchanged.

    GET  /v2                                       server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready         200 when true (ready: 503 + Retry-After when not)
    GET  /v2/models/{name}[/versions/{v}]          model metadata: tensors, classes, preprocessing, precision
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Tensors (B images in a request, K = the request's max_detections):
    in   images          BYTES [B] (or [B, 1])  encoded image files (JPEG, PNG, ...): raw bytes in
                                                 binary data, base64 strings (data: URLs too) in JSON
    out  boxes           FP32  [B, K, 4]  xyxy, pixels of the original (EXIF-oriented) image
         scores          FP32  [B, K]
         labels          INT64 [B, K]     class ids (names in the metadata); 0 in padding rows
         num_detections  INT64 [B]        valid rows per image; rows past it are zeros
Request parameters: score_threshold (number), max_detections (integer), classes (names or ids,
a list or a comma-separated string), binary_data_output (bool). The detections are those /detect
gives for the same image and options (same engine, same batcher); /detect rounds them for JSON.

Binary tensor data extension: the JSON header is the first Inference-Header-Content-Length bytes
of the body, each binary tensor's bytes follow in order (parameters.binary_data_size); a BYTES
tensor's elements are each a 4-byte little-endian length and the bytes. Outputs are binary when
the request or the output asks (binary_data_output, outputs[].parameters.binary_data), which is
what tritonclient does by default. Errors are the protocol's {"error": "<message>"}, with the
status codes and limits of /detect.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Match

from server.engine import Answer, Engine
from server.errors import ApiError
from server.inputs import DetectInput, _check_options, class_refs, load_json, read_body
from server.jobs import engine_of, make_jobs, run_jobs
from server.schemas import MAX_DETECTIONS

INPUT_NAME = "images"
# name -> (datatype, numpy little-endian dtype, dims after B: "K" is the request's max_detections)
OUTPUTS: dict[str, tuple[str, str, tuple[int | str, ...]]] = {
    "boxes": ("FP32", "<f4", ("K", 4)),
    "scores": ("FP32", "<f4", ("K",)),
    "labels": ("INT64", "<i8", ("K",)),
    "num_detections": ("INT64", "<i8", ()),
}
EXTENSIONS = ["binary_tensor_data", "parameters"]
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() accepts "²"


def model_version(engine: Engine) -> str:
    """The served model's version, as GET /model and the OIP routes report it: the digest of the
    checkpoint an exported graph came from when its metadata records one, else "1"."""
    meta = getattr(getattr(engine.pipe, "backend", None), "metadata", None)
    digest = str(getattr(meta, "source_digest", "") or "")
    return digest[:12] or "1"


def model_parameters(engine: Engine, settings: Any, max_batch_size: int) -> dict[str, Any]:
    """What a client needs besides the tensors: classes, what the server does before and after the
    model (it decodes and preprocesses; the client sends files), the precision the graph runs."""
    return {
        "classes": engine.class_names,
        "backend": engine.backend_name,
        "precision": str(getattr(engine.pipe, "precision", "fp32")),
        "preprocessing": {"input": "encoded image file (JPEG, PNG, WebP, BMP, GIF, TIFF), EXIF orientation "
                                   "applied, RGB", **_jsonable(engine.input_settings)},
        "score_threshold": settings.score_threshold,
        "max_detections": settings.max_detections,
        "max_images_per_request": settings.max_images_per_request,
        "max_batch_size": max_batch_size,  # in use: batch_autotune may have lowered the setting
    }


# -- errors in the protocol's shape ------------------------------------------------------------------


class OipError(BaseModel):
    error: str = Field(..., description="what went wrong, for a person")


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    why = {400: "malformed request or tensor", 401: "missing or wrong X-API-Key", 404: "unknown model or version",
           405: "method not allowed", 408: "body not received in time", 413: "over a size or count limit",
           415: "not an image / unsupported encoding", 422: "damaged image or invalid parameter",
           503: "not ready or overloaded (Retry-After)", 504: "request timed out"}
    return {c: {"model": OipError, "description": why[c]} for c in codes}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _OipRoute(APIRoute):
    """Every error of these routes, dependencies and validation included, as {"error": "..."}."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return _error(e.status, e.detail, e.headers)
            except RequestValidationError as e:
                return _error(422, "; ".join(str(err.get("msg", "")) for err in e.errors()))

        return guarded


# -- the request body ----------------------------------------------------------------------------------


class _Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class _Requested(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor]
    outputs: list[_Requested] | None = None


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """tritonclient's request_compression_algorithm: gzip or deflate, inflated to at most `limit`."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r}: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)  # a small bomb must not inflate past the limit
    except zlib.error as e:
        raise ApiError(400, "bad_encoding", f"body is not valid {encoding}: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, "request_too_large", f"inflated request body exceeds {limit} bytes")
    return out


def _split_body(body: bytes, header_length: str | None) -> tuple[_InferRequest, bytes]:
    """(the JSON header, the binary data after it)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not _DIGITS.fullmatch(header_length.strip()) or int(header_length) > len(body):
            raise ApiError(400, "bad_request",
                           f"Inference-Header-Content-Length {header_length!r} is not a length within the body")
        n = int(header_length)
        header, binary = body[:n], body[n:]
    payload = load_json(header)  # /detect's parser: bounded nesting and number length, 400s
    try:
        return _InferRequest.model_validate(payload), binary
    except ValidationError as e:
        parts = ["{}: {}".format(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise ApiError(400, "bad_request", "invalid inference request: " + "; ".join(parts)) from None


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then that many bytes."""
    out, off = [], 0
    while off < len(raw):
        if off + 4 > len(raw):
            raise ApiError(400, "bad_request", f"input {name!r}: binary data ends inside an element's length")
        n = int.from_bytes(raw[off:off + 4], "little")
        off += 4
        if off + n > len(raw):
            raise ApiError(400, "bad_request", f"input {name!r}: element of {n} bytes runs past the binary data")
        out.append(raw[off:off + n])
        off += n
    return out


def _images(req: _InferRequest, binary: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The request's images as (name, encoded bytes), names images[i] as /detect's JSON body has."""
    offset = 0
    images: list[tuple[str, bytes]] | None = None
    for t in req.inputs:
        size = t.parameters.get("binary_data_size")
        if size is not None:  # binary inputs are consumed in order, whatever their name
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ApiError(400, "bad_request", f"input {t.name!r}: binary_data_size {size!r} "
                                                   f"does not fit the {len(binary)} bytes of binary data")
            raw, offset = binary[offset:offset + size], offset + size
        if t.name != INPUT_NAME:
            raise ApiError(400, "bad_request", f"unknown input {t.name!r}: this model takes one BYTES input "
                                               f"{INPUT_NAME!r}")
        if images is not None:
            raise ApiError(400, "bad_request", f"input {INPUT_NAME!r} given twice")
        if t.datatype != "BYTES":
            raise ApiError(400, "bad_request", f"input {INPUT_NAME!r} must be BYTES (encoded image files), "
                                               f"got {t.datatype}")
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)) or t.shape[0] < 0:
            raise ApiError(400, "bad_request", f"input {INPUT_NAME!r} must have shape [B] or [B, 1], got {t.shape}")
        count = t.shape[0]
        if count > max_images:  # before decoding anything, as /detect does
            raise ApiError(413, "too_many_images", f"{count} images in one request; the limit is {max_images}")
        if size is not None:
            elements = _bytes_elements(raw, t.name)
        elif t.data is not None:
            elements = [_b64(v, f"images[{i}]") for i, v in enumerate(_flat(t.data))]
        else:
            raise ApiError(400, "bad_request", f"input {INPUT_NAME!r} has neither data nor binary_data_size")
        if len(elements) != count:
            raise ApiError(400, "bad_request", f"input {INPUT_NAME!r}: shape {t.shape} but {len(elements)} elements")
        images = [(f"images[{i}]", e) for i, e in enumerate(elements)]
    if offset != len(binary):
        raise ApiError(400, "bad_request", f"{len(binary) - offset} bytes of binary data belong to no input")
    if not images:
        raise ApiError(400, "no_images", f"no image in the request: send a BYTES tensor {INPUT_NAME!r} of shape [B]")
    return images


def _flat(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in data:
        out.extend(_flat(v) if isinstance(v, list) else [v])
    return out


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "bad_request", f"{name}: JSON BYTES elements must be base64 strings")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{name}: not valid base64 (JSON tensors carry image files as base64; "
                                          "binary tensor data carries them raw)") from None


_INFER_OK: dict[int | str, dict[str, Any]] = {200: {
    "description": "the outputs as JSON tensors; with binary outputs requested, a JSON header (its length in "
                   "Inference-Header-Content-Length) followed by the raw tensor bytes",
    "content": {"application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _infer_body(max_images: int) -> dict[str, Any]:
    """The JSON form of an inference request, for the OpenAPI schema (the binary form is the same JSON
    header followed by the tensor bytes; Inference-Header-Content-Length says where the header ends)."""
    tensor = {"type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
        "name": {"type": "string", "enum": [INPUT_NAME]}, "datatype": {"type": "string", "enum": ["BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 2,
                  "description": "[B] or [B, 1]; B = len(data)"},
        "data": {"type": "array", "minItems": 1, "maxItems": max_images,
                 "items": {"type": "string", "format": "byte", "description": "base64 of an encoded image file"}}}}
    output = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "enum": list(OUTPUTS)},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}
    params = {"type": "object", "properties": {
        "score_threshold": {"type": "number", "minimum": 0.0, "maximum": 1.0},
        "max_detections": {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS},
        "classes": {"type": "string", "description": "class names or ids, comma-separated"},
        "binary_data_output": {"type": "boolean"}}}
    schema = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor},
        "outputs": {"type": "array", "items": output}, "parameters": params}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _options(params: dict[str, Any]) -> dict[str, Any]:
    """Request parameters -> make_jobs' options, checked by /detect's own rules."""
    score, top_k, classes = params.get("score_threshold"), params.get("max_detections"), params.get("classes")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ApiError(422, "invalid_request", f"score_threshold must be a number, got {score!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ApiError(422, "invalid_request", f"max_detections must be an integer, got {top_k!r}")
    if classes is not None:
        items = [classes] if isinstance(classes, str) else classes if isinstance(classes, list) else None
        if items is None or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in items):
            raise ApiError(422, "invalid_request", "classes must be names or ids: a list or a comma-separated string")
        classes = [r for c in items for r in (class_refs([c]) if isinstance(c, str) else [c])] or None
    opts = DetectInput(images=[], score_threshold=None if score is None else float(score),
                       max_detections=top_k, classes=classes)
    _check_options(opts)
    return {"score_threshold": opts.score_threshold, "max_detections": opts.max_detections, "classes": opts.classes}


# -- the response ---------------------------------------------------------------------------------------


def _output_arrays(answers: list[Answer], k: int) -> dict[str, np.ndarray]:
    b = len(answers)
    boxes, scores = np.zeros((b, k, 4), np.float32), np.zeros((b, k), np.float32)
    labels, counts = np.zeros((b, k), np.int64), np.zeros((b,), np.int64)
    for i, a in enumerate(answers):
        n = min(len(a.scores), k)
        boxes[i, :n], scores[i, :n], labels[i, :n], counts[i] = a.boxes[:n], a.scores[:n], a.labels[:n], n
    return {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": counts}


def _wanted_outputs(req: _InferRequest) -> list[tuple[str, bool]]:
    """(output name, as binary data) in the order of the response; checked before any work."""
    default_binary = req.parameters.get("binary_data_output") is True
    if req.outputs is None:
        return [(n, default_binary) for n in OUTPUTS]
    wanted = []
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise ApiError(400, "bad_request", f"unknown output {o.name!r}; outputs are {', '.join(OUTPUTS)}")
        if "class_count" in o.parameters:
            raise ApiError(400, "bad_request", "the classification extension (class_count) is not supported")
        wanted.append((o.name, o.parameters.get("binary_data", default_binary) is True))
    return wanted


def _infer_response(req: _InferRequest, wanted: list[tuple[str, bool]], arrays: dict[str, np.ndarray],
                    name: str, version: str) -> Response:
    outputs, chunks = [], []
    for out_name, binary in wanted:
        datatype, dtype, _ = OUTPUTS[out_name]
        arr = arrays[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(dtype, copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *chunks]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# -- routes ---------------------------------------------------------------------------------------------


def _served(request: Request, name: str, version: str | None) -> Engine:
    """The engine, if `name` (and `version`, when given) are the model this server runs; else 404."""
    engine = engine_of(request.app.state)
    served_version = model_version(engine)
    if name != engine.model_name or (version is not None and version != served_version):
        asked = name if version is None else f"{name} version {version}"
        raise ApiError(404, "unknown_model", f"unknown model {asked!r}: this server serves "
                                             f"{engine.model_name!r} version {served_version!r}")
    return engine


def build_routers(require_key: Callable[..., None], *, max_images: int) -> tuple[APIRouter, APIRouter]:
    """(public health routes, routes behind the server's API key); max_images: the request limit the
    schema states."""
    public = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"], route_class=_OipRoute)
    keyed = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"], route_class=_OipRoute,
                      dependencies=[Depends(require_key)])

    @public.get("", summary="Server metadata", responses=_responses(503))
    async def server_metadata(request: Request) -> dict[str, Any]:
        return {"name": "frcnn", "version": request.app.version, "extensions": EXTENSIONS}

    @public.get("/health/live", summary="Liveness: the process answers")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @public.get("/health/ready", summary="Readiness: model loaded and warmed up, not stopping",
                responses=_responses(503))
    async def ready(request: Request) -> dict[str, bool]:
        engine_of(request.app.state)  # 503 with Retry-After while loading or stopping
        return {"ready": True}

    async def metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        engine = _served(request, name, version)
        return {
            "name": engine.model_name,
            "versions": [model_version(engine)],
            "platform": f"frcnn_{engine.backend_name}",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": dt, "shape": [-1] + [-1 if d == "K" else d for d in dims]}
                        for n, (dt, _, dims) in OUTPUTS.items()],
            "parameters": model_parameters(engine, request.app.state.settings,
                                           request.app.state.batcher.max_batch_size),
        }

    async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        engine = _served(request, name, version)
        return {"name": engine.model_name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        engine = _served(request, name, version)
        settings = request.app.state.settings
        body = await read_body(request, settings.max_upload_bytes)
        body = _decompress(body, request.headers.get("content-encoding"), settings.max_upload_bytes)
        req, binary = _split_body(body, request.headers.get("inference-header-content-length"))
        images = _images(req, binary, settings.max_images_per_request)
        wanted = _wanted_outputs(req)
        try:
            jobs = make_jobs(engine, settings, images, **_options(req.parameters))
        except ValueError as e:  # a class spelled in a way no parser takes
            raise ApiError(422, "unknown_class", str(e)) from None
        answers = await run_jobs(request.app.state, jobs, request)  # request: cancelled if the client goes
        arrays = _output_arrays(answers, jobs[0].max_detections)
        return _infer_response(req, wanted, arrays, engine.model_name, model_version(engine))

    for path, suffix in (("/models/{name}", ""), ("/models/{name}/versions/{version}", "_version")):
        keyed.add_api_route(path, metadata, methods=["GET"], name="model_metadata" + suffix,
                            summary="Model metadata: tensors, classes, preprocessing, precision",
                            responses=_responses(401, 404, 503))
        keyed.add_api_route(path + "/ready", model_ready, methods=["GET"], name="model_ready" + suffix,
                            summary="Model readiness", responses=_responses(401, 404, 503))
        keyed.add_api_route(path + "/infer", infer, methods=["POST"], name="infer" + suffix,
                            summary="Detect objects: BYTES images [B] -> boxes, scores, labels, num_detections",
                            description="Body: an inference request (JSON, or JSON header + binary tensor data "
                                        "with Inference-Header-Content-Length); see server/oip.py.",
                            responses={**_INFER_OK, **_responses(400, 401, 404, 408, 413, 415, 422, 503, 504)},
                            openapi_extra=_infer_body(max_images))

    @public.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(request: Request, rest: str) -> Response:
        """Triton's other extensions and wrong methods, answered in the protocol's shape."""
        for route in (*keyed.routes, *public.routes):  # path and method of these routes, prefix included
            if route is not unknown_route and route.matches(request.scope)[0] == Match.PARTIAL:
                return _error(405, f"{request.method} not allowed on /v2/{rest}",
                              headers={"Allow": ", ".join(sorted(getattr(route, "methods", ()) or ()))})
        return _error(404, f"/v2/{rest}: not served (extensions: {', '.join(EXTENSIONS)})")

    unknown_route = public.routes[-1]

    return public, keyed


def include_oip(app: FastAPI, *, require_key: Callable[..., None]) -> None:
    public, keyed = build_routers(require_key, max_images=app.state.settings.max_images_per_request)
    app.include_router(keyed)
    app.include_router(public)  # last: its catch-all must not shadow the model routes
