"""POST /detect bodies -> (images as (name, bytes), options), enforcing the request limits.

Accepted bodies:
    multipart/form-data  files in `images` (repeatable) or `image`; fields score_threshold,
                         max_detections, classes (repeatable or comma-separated)
    application/json     {"images": [base64 | data URL, ...], "names": [...]?, "score_threshold"?,
                         "max_detections"?, "classes"?}
Query parameters score_threshold, max_detections, classes work with both; the body wins.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from server.errors import ApiError
from server.schemas import DetectJSON


@dataclass
class DetectInput:
    images: list[tuple[str, bytes]]
    score_threshold: float | None
    max_detections: int | None
    classes: list[str | int] | None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes (413) before reading it when the length
    is declared and as soon as it is exceeded when it is streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"request body of {declared} bytes exceeds {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "client disconnected while sending") from None
    return b"".join(chunks)


async def parse(request: Request, *, max_upload_bytes: int, max_images: int) -> DetectInput:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_upload_bytes)
    if ctype == "multipart/form-data":
        out = await _parse_multipart(request, body, max_images)
    elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        out = _parse_json(body)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'} not accepted: send multipart/form-data or application/json")
    q = request.query_params
    if out.score_threshold is None and "score_threshold" in q:
        out.score_threshold = _float(q["score_threshold"], "score_threshold")
    if out.max_detections is None and "max_detections" in q:
        out.max_detections = _int(q["max_detections"], "max_detections")
    if out.classes is None and "classes" in q:
        out.classes = _split(q.getlist("classes"))
    _check_options(out)
    if not out.images:
        raise ApiError(400, "no_images", "no image in the request: send files in the `images` field")
    if len(out.images) > max_images:
        raise ApiError(413, "too_many_images", f"{len(out.images)} images in one request; the limit is {max_images}")
    return out


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> DetectInput:
    sent = False

    async def replay() -> dict:  # hand the already-read body to Starlette's multipart parser
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, replay)
    try:
        form = await replayed.form(max_files=max_images + 1, max_fields=64)
    except Exception as e:  # malformed multipart, too many parts
        raise ApiError(400, "bad_multipart", f"cannot parse multipart body: {getattr(e, 'detail', e)}") from None
    try:
        images: list[tuple[str, bytes]] = []
        for key in ("images", "image"):
            for i, value in enumerate(form.getlist(key)):
                if isinstance(value, UploadFile):
                    images.append((value.filename or f"{key}[{i}]", await value.read()))
                else:
                    raise ApiError(422, "not_a_file", f"form field `{key}` must be a file upload", image=f"{key}[{i}]")
        classes = [str(c) for c in form.getlist("classes")]
        return DetectInput(
            images=images,
            score_threshold=_float(form.get("score_threshold"), "score_threshold"),
            max_detections=_int(form.get("max_detections"), "max_detections"),
            classes=_split(classes) if classes else None,
        )
    finally:
        await form.close()


def _parse_json(body: bytes) -> DetectInput:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from None
    try:
        req = DetectJSON.model_validate(payload)
    except ValidationError as e:
        parts = ["{}: {}".format(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None
    if req.names is not None and len(req.names) != len(req.images):
        raise ApiError(422, "invalid_request", "`names` must have one entry per image")
    images = []
    for i, b64 in enumerate(req.images):
        name = req.names[i] if req.names else f"images[{i}]"
        images.append((name, _b64decode(b64, name)))
    return DetectInput(images=images, score_threshold=req.score_threshold,
                       max_detections=req.max_detections, classes=req.classes)


def _b64decode(text: str, name: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{name}: not valid base64", image=name) from None


def _float(v: object, name: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_request", f"{name} must be a number, got {v!r}") from None


def _int(v: object, name: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_request", f"{name} must be an integer, got {v!r}") from None


def _split(values: list[str]) -> list[str | int]:
    out: list[str | int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(int(part) if part.isdigit() else part)
    return out


def _check_options(inp: DetectInput) -> None:
    if inp.score_threshold is not None and not 0.0 <= inp.score_threshold <= 1.0:
        raise ApiError(422, "invalid_request", f"score_threshold must be in [0, 1], got {inp.score_threshold}")
    if inp.max_detections is not None and not 1 <= inp.max_detections <= 1000:
        raise ApiError(422, "invalid_request", f"max_detections must be in [1, 1000], got {inp.max_detections}")
