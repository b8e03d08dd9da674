"""POST /detect bodies -> (images as (name, bytes), options), enforcing the request limits.

Accepted bodies:
    multipart/form-data  files in `images` (repeatable) or `image`; fields score_threshold,
                         max_detections, classes (repeatable or comma-separated)
    application/json     {"images": [base64 | data URL, ...], "names": [...]?, "score_threshold"?,
                         "max_detections"?, "classes"?}
Query parameters score_threshold, max_detections, classes work with both; the body wins.

Everything here reads bytes a client chose, so every failure is the client's: numbers are parsed
with strict ASCII patterns (str.isdigit() and int() accept "²" and "٣"), JSON nesting and number
length are bounded before the parser sees them, and whatever a parser still raises becomes a 400.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from server.errors import ApiError
from server.schemas import MAX_DETECTIONS, DetectJSON

MAX_JSON_DEPTH = 32  # our bodies nest 2 deep; 100,000 levels would exhaust the parser's recursion
MAX_NUMBER_CHARS = 32  # a 5,000-digit JSON integer costs quadratic time and int() refuses > 4,300 digits

_INT = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_CLASS_ID = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass
class DetectInput:
    images: list[tuple[str, bytes]]
    score_threshold: float | None
    max_detections: int | None
    classes: list[str | int] | None


# -- strict scalars (form fields and query parameters arrive as text) ----------------------------

def strict_int(text: str, name: str) -> int:
    """ASCII decimal integer, optional sign, at most 18 digits; anything else is a 422."""
    s = text.strip(" \t")
    if not _INT.fullmatch(s):
        raise ApiError(422, "invalid_request", f"{name} must be an integer, got {_shown(text)}")
    return int(s)


def strict_float(text: str, name: str) -> float:
    """ASCII decimal number (no nan, inf, underscores or non-ASCII digits); anything else is a 422."""
    s = text.strip(" \t")
    if not _FLOAT.fullmatch(s):
        raise ApiError(422, "invalid_request", f"{name} must be a number, got {_shown(text)}")
    return float(s)


def class_refs(values: list[str]) -> list[str | int]:
    """Repeated and comma-separated class references -> names (str) and ids (int, ASCII digits only)."""
    out: list[str | int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(int(part) if _CLASS_ID.fullmatch(part) else part)
    return out


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


# -- JSON with bounded nesting and number length -------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal (escapes included)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, np.int32)
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in `body`; brackets inside strings do not count."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, np.uint8)]).max())


def _bounded(convert):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise ApiError(400, "bad_json", f"number of {len(text)} characters in the body; "
                                            f"at most {MAX_NUMBER_CHARS} are accepted")
        return convert(text)
    return parse


def _json_number(x: float) -> float | int:
    # JSON Schema's "integer" is any number with no fraction (3.0 too): such numbers are ints here
    return int(x) if x.is_integer() else x


def _no_constant(text: str):
    raise ApiError(400, "bad_json", f"body is not valid JSON: {text} is not a JSON value")


def load_json(body: bytes) -> object:
    """json.loads with nesting, number length and NaN/Infinity refused as the client's 400s."""
    opens = len(body) - len(body.translate(None, b"[{"))  # base64 has none: real bodies stop here
    if opens > MAX_JSON_DEPTH and (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise ApiError(400, "bad_json", f"JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        return json.loads(body, parse_int=_bounded(int), parse_float=_bounded(lambda t: _json_number(float(t))), parse_constant=_no_constant)
    except (UnicodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from None
    except RecursionError:  # the depth check counts brackets; this is only the parser's own last word
        raise ApiError(400, "bad_json", "JSON nested too deeply") from None


# -- the request ---------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes (413) before reading it when the length
    is declared and as soon as it is exceeded when it is streamed."""
    declared = request.headers.get("content-length", "").strip()
    if _INT.fullmatch(declared) and int(declared) > limit:
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


async def parse(request: Request, *, max_upload_bytes: int, max_images: int,
                check_classes: Callable[[list[str | int]], object] | None = None) -> DetectInput:
    """The request's images and options. `check_classes` (engine.class_ids) validates query classes
    that the body's overrode: every value a client sends is checked, used or not."""
    try:
        return await _parse(request, max_upload_bytes=max_upload_bytes, max_images=max_images,
                            check_classes=check_classes)
    except (ValueError, TypeError, LookupError, RecursionError, OverflowError) as e:
        # A parser's exception we did not foresee is still about the client's bytes: 400, never 500.
        raise ApiError(400, "bad_request", f"cannot parse the request: {type(e).__name__}") from None


async def _parse(request: Request, *, max_upload_bytes: int, max_images: int,
                 check_classes: Callable[[list[str | int]], object] | None) -> DetectInput:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_upload_bytes)
    if ctype == "multipart/form-data":
        out = await _parse_multipart(request, body, max_images)
    elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        out = _parse_json(body, max_images)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'} not accepted: send multipart/form-data or application/json")
    _check_options(out)
    query = _query_options(request)
    _check_options(query)
    if query.classes and out.classes and check_classes is not None:
        try:
            check_classes(query.classes)
        except KeyError as e:
            raise ApiError(422, "unknown_class", str(e.args[0])) from None
    # the body's fields win over the query's
    out.score_threshold = query.score_threshold if out.score_threshold is None else out.score_threshold
    out.max_detections = query.max_detections if out.max_detections is None else out.max_detections
    out.classes = query.classes if out.classes is None else out.classes
    if not out.images:
        raise ApiError(400, "no_images", "no image in the request: send files in the `images` field")
    _check_count(len(out.images), max_images)
    return out


def _query_options(request: Request) -> DetectInput:
    q = request.query_params
    score, top_k = q.get("score_threshold"), q.get("max_detections")
    return DetectInput(images=[], score_threshold=strict_float(score, "score_threshold") if score else None,
                       max_detections=strict_int(top_k, "max_detections") if top_k else None,
                       classes=class_refs(q.getlist("classes")) or None)


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request; the limit is {max_images}")


MAX_FORM_FIELDS = 64  # text parts (score_threshold, max_detections, classes...) per request
MAX_FIELD_BYTES = 1 << 20  # one text part


class _Form:
    """A multipart/form-data body read in memory by python-multipart's parser: `parts` in body order,
    (name, bytes, filename) for a file part and (name, str, None) for a text part.

    The body is already in memory (read_body bounded it), so parts are slices of it: no spooled
    temporary files, UploadFile or FormData (Starlette's form() cost about 0.2 ms a request).
    The limits are Starlette's: files, text fields and a text field's size are bounded, and every
    parser error is the client's (ValueError here, a 400 or 413 in _parse_multipart)."""

    def __init__(self, body: bytes, content_type: str, max_files: int, plain: bool = True) -> None:
        """plain=False: python-multipart for every body (the tests' reference)."""
        boundary, charset = _multipart_params(content_type)
        parts = _plain_parts(body, boundary, charset, max_files) if plain else None
        self.parts: list[tuple[str, bytes | str, str | None]] = parts if parts is not None else []
        if parts is None:
            self._parse(body, boundary, charset, max_files)

    def _parse(self, body: bytes, boundary: bytes, charset: str, max_files: int) -> None:
        """python-multipart's parser, for every body _plain_parts leaves to it."""
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header

        files = fields = size = 0
        header_name, header_value = bytearray(), bytearray()
        disposition = b""
        data: list[bytes] = []
        filename: str | None = None
        name = ""

        def on_part_begin() -> None:
            nonlocal disposition, size
            disposition, size = b"", 0
            data.clear()

        def on_header_field(buf: bytes, start: int, end: int) -> None:
            header_name.extend(buf[start:end])

        def on_header_value(buf: bytes, start: int, end: int) -> None:
            header_value.extend(buf[start:end])

        def on_header_end() -> None:
            nonlocal disposition
            if header_name.lower() == b"content-disposition":
                disposition = bytes(header_value)
            header_name.clear()
            header_value.clear()

        def on_part_data(buf: bytes, start: int, end: int) -> None:
            nonlocal size
            size += end - start
            if filename is None and size > MAX_FIELD_BYTES:
                raise ValueError(f"a form field exceeds {MAX_FIELD_BYTES // 1024} KB")
            data.append(buf[start:end])

        def on_headers_finished() -> None:
            nonlocal files, fields, filename, name
            _, options = parse_options_header(disposition)
            if b"name" not in options:
                raise ValueError('a part\'s Content-Disposition has no "name"')
            name = _decode(options[b"name"], charset)
            if b"filename" in options:
                files += 1
                if files > max_files:
                    raise _TooManyFiles(max_files)
                filename = _decode(options[b"filename"], charset)
            else:
                fields += 1
                if fields > MAX_FORM_FIELDS:
                    raise ValueError(f"more than {MAX_FORM_FIELDS} form fields")
                filename = None

        def on_part_end() -> None:
            value = b"".join(data)
            self.parts.append((name, value if filename is not None else _decode(value, charset), filename))
            data.clear()

        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished})
        try:
            parser.write(body)
            parser.finalize()
        except FormParserError:
            raise ValueError("invalid multipart data") from None

    def getlist(self, name: str) -> list[tuple[bytes | str, str | None]]:
        """(value, filename or None) of every part called `name`, in body order."""
        return [(v, f) for k, v, f in self.parts if k == name]

    def text(self, name: str) -> str | None:
        """The last text part called `name` (a file there is a 422), or None."""
        values = self.getlist(name)
        if not values:
            return None
        value, filename = values[-1]
        if filename is not None:
            raise ApiError(422, "invalid_request", f"form field `{name}` must be text, not a file")
        return value  # type: ignore[return-value]


class _TooManyFiles(ValueError):
    pass


@functools.lru_cache(maxsize=64)
def _multipart_params(content_type: str) -> tuple[bytes, str]:
    """(boundary, charset) of a multipart Content-Type (a client sends the same one every time)."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("missing boundary in multipart content type")
    return boundary, params.get(b"charset", b"utf-8").decode("latin-1")


# The part headers clients write (httpx, requests, curl, browsers' FormData): one Content-Disposition
# with a plain ASCII name and filename, at most one Content-Type. Header names in any case (as
# _Form._parse compares them), the rest exactly so.
_PLAIN_DISPOSITION = re.compile(
    rb'(?i:content-disposition): form-data; name="([A-Za-z0-9_.\-\[\]]{1,64})"(?:; filename="([A-Za-z0-9_.\- ()+,]{0,255})")?')
_PLAIN_TYPE = re.compile(rb"(?i:content-type): [!-~]{1,127}")


def _plain_parts(body: bytes, boundary: bytes, charset: str, max_files: int
                 ) -> list[tuple[str, bytes | str, str | None]] | None:
    """_Form's parts of a body in the plain shape clients send, found with a few bytes.find calls
    (python-multipart's callbacks cost about 0.15 ms of a request's 200 kB photo, more right after a
    backend call), or None: anything else, or any limit reached, goes to python-multipart, which gives
    its answer or its error. Where this returns parts they are python-multipart's (the tests compare
    the two on client bodies and on thousands of mutated ones)."""
    delimiter = b"\r\n--" + boundary
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    parts: list[tuple[str, bytes | str, str | None]] = []
    files = fields = 0
    at = len(delimiter) - 2  # just past the first delimiter (the body's has no CRLF before it), at its CRLF
    while True:
        head_end = body.find(b"\r\n\r\n", at + 2, at + 2 + 1024)
        if head_end < 0:
            return None
        disposition = None
        for line in body[at + 2:head_end].split(b"\r\n"):
            if disposition is None and (m := _PLAIN_DISPOSITION.fullmatch(line)):
                disposition = m
            elif not _PLAIN_TYPE.fullmatch(line):
                return None  # another header, a second disposition, or one written otherwise
        if disposition is None:
            return None
        end = body.find(delimiter, head_end + 4)
        if end < 0:
            return None
        value = body[head_end + 4:end]
        name, filename = disposition.group(1).decode("ascii"), disposition.group(2)
        if filename is not None:
            files += 1
            if files > max_files:
                return None
            parts.append((name, value, filename.decode("ascii")))
        else:
            fields += 1
            if fields > MAX_FORM_FIELDS or len(value) > MAX_FIELD_BYTES:
                return None
            parts.append((name, _decode(value, charset), None))
        at = end + len(delimiter)
        after = body[at:at + 2]
        if after == b"--":
            return parts if body[at + 2:] in (b"", b"\r\n") else None
        if after != b"\r\n":
            return None


def _decode(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> DetectInput:
    try:
        form = _Form(body, request.headers.get("content-type", ""), max_images)
    except _TooManyFiles:
        raise ApiError(413, "too_many_images",
                       f"more than {max_images} files in one request; the limit is {max_images}") from None
    except ValueError as e:  # malformed multipart, too many parts, a field too large
        raise ApiError(400, "bad_multipart", f"cannot parse multipart body: {e}") from None
    images: list[tuple[str, bytes]] = []
    for key in ("images", "image"):
        for n, (value, filename) in enumerate(form.getlist(key)):
            if filename is None:
                raise ApiError(422, "not_a_file", f"form field `{key}` must be a file upload", image=f"{key}[{n}]")
            images.append((filename or f"{key}[{n}]", value))  # type: ignore[arg-type]
    score, top_k = form.text("score_threshold"), form.text("max_detections")
    classes = [v for v, filename in form.getlist("classes") if filename is None]
    return DetectInput(
        images=images,
        score_threshold=strict_float(score, "score_threshold") if score else None,
        max_detections=strict_int(top_k, "max_detections") if top_k else None,
        classes=class_refs(classes) or None,  # type: ignore[arg-type]
    )


def _parse_json(body: bytes, max_images: int) -> DetectInput:
    payload = load_json(body)
    try:
        req = DetectJSON.model_validate(payload, strict=True)  # the schema's types, no coercion
    except ValidationError as e:
        parts = ["{}: {}".format(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None
    _check_count(len(req.images), max_images)  # before decoding any base64
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


def _check_options(inp: DetectInput) -> None:
    if inp.score_threshold is not None and not 0.0 <= inp.score_threshold <= 1.0:
        raise ApiError(422, "invalid_request", f"score_threshold must be in [0, 1], got {inp.score_threshold}")
    if inp.max_detections is not None and not 1 <= inp.max_detections <= MAX_DETECTIONS:
        raise ApiError(422, "invalid_request",
                       f"max_detections must be in [1, {MAX_DETECTIONS}], got {inp.max_detections}")
