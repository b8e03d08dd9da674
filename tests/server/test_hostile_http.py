"""Hostile HTTP against the real server on loopback: client mistakes that used to be text/plain 500s,
too many images, read deadlines (raw sockets), the header size limit, the connection cap, and
bounded metrics labels.

Two servers: the shared `live` one (conftest: max_images_per_request=4) for request parsing, and
`guarded`, with deadlines short enough to watch (body 1.5 s, headers 1 s, 3 connections).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from srv_helpers import jpeg_bytes, serve

JPEG = jpeg_bytes((64, 48))
BODY_S, HEADER_S, MAX_CONN = 1.5, 1.0, 3


def _json_error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["error"] == kind and set(body) == {"error", "detail", "image"}, body


# -- numbers, JSON bounds: every one of these was a text/plain 500 ---------------------------------

def _deep(levels: int) -> bytes:
    return b'{"images": ["AAAA"], "x": ' + b"[" * levels + b"]" * levels + b"}"


@pytest.mark.parametrize("how", ["query", "form", "json"])
@pytest.mark.parametrize("ref", ["²", "٣", "1²", "³⁴"])
def test_non_ascii_digit_class_is_422(live, how, ref):
    with httpx.Client(base_url=live, timeout=60) as c:
        if how == "query":
            r = c.post("/detect", params={"classes": ref}, files={"images": ("a.jpg", JPEG, "image/jpeg")})
        elif how == "form":
            r = c.post("/detect", data={"classes": ref}, files={"images": ("a.jpg", JPEG, "image/jpeg")})
        else:
            r = c.post("/detect", json={"images": [base64.b64encode(JPEG).decode()], "classes": [ref]})
    _json_error(r, 422, "unknown_class")
    assert repr(ref) in r.json()["detail"]


@pytest.mark.parametrize("field,text", [
    ("max_detections", "٣"), ("max_detections", "1_0"), ("max_detections", "²"), ("max_detections", "7" * 5000),
    ("max_detections", "0x10"), ("score_threshold", "nan"), ("score_threshold", "inf"), ("score_threshold", "٠.٥"),
    ("score_threshold", "1_0"), ("score_threshold", "0." + "5" * 5000),
])
@pytest.mark.parametrize("how", ["query", "form"])
def test_strict_numbers_in_fields_and_query(live, field, text, how):
    where = {"params": {field: text}} if how == "query" else {"data": {field: text}}
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", files={"images": ("a.jpg", JPEG, "image/jpeg")}, **where)
    _json_error(r, 422, "invalid_request")
    assert field in r.json()["detail"]


@pytest.mark.parametrize("body,why", [
    (_deep(100_000), "nested 100001 levels"),
    (_deep(33), "nested 34 levels"),
    (b'{"images": ["AAAA"], "max_detections": ' + b"7" * 5000 + b"}", "5000 characters"),
    (b'{"images": ["AAAA"], "score_threshold": 0.' + b"5" * 5000 + b"}", "5002 characters"),
    (b'{"images": ["AAAA"], "score_threshold": NaN}', "NaN"),
    (b'{"images": ["\xff\xfe\xfa"]}', "not valid JSON"),
])
def test_hostile_json_is_400(live, body, why):
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", content=body, headers={"content-type": "application/json"})
    _json_error(r, 400, "bad_json")
    assert why in r.json()["detail"]


def test_brackets_inside_strings_do_not_count_as_nesting(live):
    """The nesting bound counts structure, not text: a name full of brackets is fine."""
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", json={"images": [base64.b64encode(JPEG).decode()], "names": ["[" * 500 + "\\\"{"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["image"] == "[" * 500 + "\\\"{"


def test_json_types_are_the_schemas(live):
    """Strict validation: what /openapi.json says is a number is not also a string."""
    img = base64.b64encode(JPEG).decode()
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", json={"images": [img], "score_threshold": "0.5"})
        _json_error(r, 422, "invalid_request")
        r = c.post("/detect", json={"images": [img], "max_detections": True})
        _json_error(r, 422, "invalid_request")
        r = c.post("/detect", json={"images": [img], "score_threshold": 0, "max_detections": 3, "classes": [1]})
        assert r.status_code == 200, r.text


# -- one answer per limit --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 6, 40])
def test_too_many_images_is_413_however_detected(live, n):
    """live allows 4: the 5th file is counted by us, the 6th and later stop Starlette's parser."""
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", files=[("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(n)])
        _json_error(r, 413, "too_many_images")
        r = c.post("/detect", json={"images": [base64.b64encode(JPEG).decode()] * n})
        _json_error(r, 413, "too_many_images")
        r = c.post("/detect", files=[("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(4)])
        assert r.status_code == 200 and len(r.json()["results"]) == 4


# -- no route answers a client's input with a text/plain 500 ---------------------------------------

_HOSTILE_QUERIES = ["classes=%C2%B2", "max_detections=%D9%A3", "score_threshold=nan", "index=%C2%B2",
                    "version=" + "9" * 5000, "x=%ff%fe"]
_HOSTILE_BODIES = [
    ("application/json", _deep(100_000)),
    ("application/json", b'{"inputs": [{"name": "x", "shape": [' + b"9" * 5000 + b'], "datatype": "BYTES"}]}'),
    ("application/json", b"\xff\xfe{"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"classes\"\r\n\r\n\xc2\xb2\r\n--b--"),
    ("application/x-www-form-urlencoded", b"classes=%C2%B2&max_detections=%D9%A3"),
    ("text/plain", b"\x00" * 100),
]


def _routes(url: str) -> list[tuple[str, str]]:
    """(method, path) of every route: the documented ones plus the page; path parameters filled."""
    spec = httpx.get(url + "/openapi.json", timeout=60).json()
    out = [("GET", "/")]
    for path, item in spec["paths"].items():
        for method in item:
            if method.upper() in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                filled = path
                for part in path.split("/"):
                    if part.startswith("{"):
                        filled = filled.replace(part, "%C2%B2", 1)
                out.append((method.upper(), filled))
    return out


def test_no_route_answers_client_input_with_500(live):
    routes = _routes(live)
    assert ("POST", "/detect") in routes and len(routes) >= 6
    seen = 0
    with httpx.Client(base_url=live, timeout=60) as c:
        for method, path in routes:
            for query in _HOSTILE_QUERIES:
                for ctype, body in (_HOSTILE_BODIES if method != "GET" else [(None, b"")]):
                    headers = {"content-type": ctype} if ctype else {}
                    r = c.request(method, f"{path}?{query}", content=body or None, headers=headers)
                    seen += 1
                    assert r.status_code < 500 or r.status_code in (503, 504), (method, path, query, ctype, r.text)
                    if r.status_code >= 400:
                        assert r.headers["content-type"].startswith("application/json"), (method, path, r.headers)
    assert seen > 50


# -- the guarded server: deadlines, header size, connection cap ------------------------------------

@pytest.fixture(scope="module")
def guarded(make_settings):
    """A server with short deadlines, and one route that fails the way a bug would."""
    from server import create_app

    settings = make_settings(body_timeout_s=BODY_S, header_timeout_s=HEADER_S, max_connections=MAX_CONN,
                             max_header_bytes=8192)
    app = create_app(settings)

    @app.get("/test-only/bug", include_in_schema=False)
    async def bug() -> None:
        raise RuntimeError("a server bug, not the client's")

    with serve(settings, app=app) as (url, _):
        parts = urlsplit(url)
        yield url, (parts.hostname, parts.port)


def _connect(addr) -> socket.socket:
    s = socket.create_connection(addr, timeout=30)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 30 s socket timeout fails the test)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _status_and_json(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body), head


def test_stalled_body_gets_408_and_close(guarded):
    _, addr = guarded
    s = _connect(addr)
    t0 = time.monotonic()
    s.sendall(b"POST /detect HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
              b'{"images": ["')
    raw = _read_until_closed(s)  # returns only because the server closes the connection
    waited = time.monotonic() - t0
    status, body, head = _status_and_json(raw)
    assert status == 408 and body["error"] == "request_timeout" and b"connection: close" in head.lower()
    assert BODY_S - 0.1 <= waited < BODY_S + 5, waited
    metrics = httpx.get(guarded[0] + "/metrics", timeout=30).text
    assert 'method="POST",route="/detect",status="408"' in metrics


def test_trickled_body_is_cut_at_the_whole_body_deadline(guarded):
    """Bytes that keep coming do not extend the deadline: it is for the whole body."""
    _, addr = guarded
    s = _connect(addr)
    t0 = time.monotonic()
    s.sendall(b"POST /detect HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
    try:
        for _ in range(40):  # one byte every 0.1 s: 4 s if never cut
            s.sendall(b" ")
            time.sleep(0.1)  # the client's pace (the scenario), not synchronisation
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw = _read_until_closed(s)
    status, body, _ = _status_and_json(raw)
    assert status == 408 and "body" in body["detail"]
    assert time.monotonic() - t0 < BODY_S + 5


def test_trickled_headers_get_408_and_close(guarded):
    _, addr = guarded
    s = _connect(addr)
    t0 = time.monotonic()
    request = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
    try:
        for byte in request:  # one byte every 0.05 s: 5.7 s if never cut
            s.sendall(bytes([byte]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw = _read_until_closed(s)
    status, body, _ = _status_and_json(raw)
    assert status == 408 and "headers" in body["detail"]
    assert time.monotonic() - t0 < HEADER_S + 4


def test_silent_connection_is_closed(guarded):
    _, addr = guarded
    s = _connect(addr)
    t0 = time.monotonic()
    assert _read_until_closed(s) == b""  # nothing was asked: closed without an answer
    assert HEADER_S - 0.1 <= time.monotonic() - t0 < HEADER_S + 4


def test_oversized_headers_get_431(guarded):
    _, addr = guarded
    for chunks in ([b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n"],  # one write: the headers end in it
                   [b"X-Big: " + b"a" * 5000, b"a" * 5000]):  # never ends: refused before it is buffered
        s = _connect(addr)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        try:
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body, _ = _status_and_json(_read_until_closed(s))
        assert status == 431 and body["error"] == "headers_too_large"


def test_connection_cap_refuses_with_json_503(guarded):
    url, addr = guarded
    held = []
    try:
        for _ in range(MAX_CONN):  # each answered once: the server has certainly counted it
            s = _connect(addr)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200"), "held connection not served"
            held.append(s)
        s = _connect(addr)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        status, body, head = _status_and_json(_read_until_closed(s))
        assert status == 503 and body["error"] == "too_many_connections"
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closes asynchronously: poll for the first served request
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
    assert r.status_code == 200


def test_unparsable_http_is_json_400(guarded):
    _, addr = guarded
    s = _connect(addr)
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header Without Colon\r\n\r\n")
    status, body, _ = _status_and_json(_read_until_closed(s))
    assert status == 400 and body["error"] == "bad_http"


def test_a_server_bug_is_a_json_500(guarded):
    url, _ = guarded
    r = httpx.get(url + "/test-only/bug", timeout=30)
    _json_error(r, 500, "internal_error")
    assert "a server bug" not in r.text  # the traceback goes to the log, not to the client


def test_metrics_labels_are_bounded(guarded):
    url, _ = guarded
    with httpx.Client(base_url=url, timeout=30) as c:
        for verb in ("PROPFIND", "MKCOL", "LOCK", "COPY", "SEARCH"):  # WebDAV verbs httptools parses
            assert c.request(verb, "/detect").status_code == 405
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.get("/no/such/page").status_code == 404
        text = c.get("/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("frcnn_requests_total{")]
    methods = {ln.split('method="')[1].split('"')[0] for ln in lines}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}, methods
    assert 'method="other",route="/detect",status="405"' in text
    assert 'route="/docs"' in text and 'route="/openapi.json"' in text and 'route="unmatched",status="404"' in text


# -- one write per response (guard.HeldHeaders) ----------------------------------------------------

class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Cycle:
    response_started = False


@pytest.mark.parametrize("ending", ["body", "no_body", "close"])
def test_held_headers_leave_with_the_first_body_write(ending):
    from server.guard import HeldHeaders

    t, cycle = _Transport(), _Cycle()
    w = HeldHeaders(t, cycle)
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert len(t.writes) == 1  # held
    if ending == "body":
        w.write(b"{}")
        w.flush()
        assert t.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    elif ending == "no_body":  # HEAD, 204: flushed when the response completes
        w.flush()
        w.flush()
        assert t.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"]
    else:
        w.close()
        assert t.closed and t.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"]
    assert w.is_closing() is t.closed


def test_head_100_continue_and_keep_alive_through_the_real_server(guarded):
    """Responses without a body write (HEAD: here the 405 of a GET-only route, headers only) still
    leave; Expect: 100-continue gets its interim answer before the body is sent; requests after
    them on the same connection get whole responses."""
    _, addr = guarded
    s = _connect(addr)
    s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 405") and head.endswith(b"\r\n\r\n") and b"content-length: " in head, head
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + JPEG + f"\r\n--{boundary}--\r\n".encode()
    s.sendall(f"POST /detect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n"
              f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
    assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and json.loads(rest)["results"][0]["image"] == "a.jpg"
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, payload, _ = _status_and_json(_read_until_closed(s))
    assert status == 200 and payload == {"status": "ok"}
    s.close()
