"""Every kind of client mistake gets a 4xx JSON error naming the file, and the server stays up.

The shared `live` server has max_images_per_request=4, max_upload_bytes=2_000_000, max_pixels=4_000_000.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from srv_helpers import jpeg_bytes


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


CASES = [
    # (file name, bytes, status, error kind)
    ("empty.jpg", b"", 400, "empty_image"),
    ("notes.txt", b"this is not an image at all", 415, "unsupported_image"),
    ("icon.ico", None, 415, "unsupported_image"),
    ("cut.jpg", _truncated_jpeg(), 422, "corrupt_image"),
    ("bomb.png", _png_header_only(30_000, 30_000), 413, "image_too_large"),
    ("big.png", _png_header_only(2_500, 2_000), 413, "image_too_large"),  # 5 Mpx > the test limit of 4
]


def _made(name: str) -> bytes:
    buf = io.BytesIO()
    if name.endswith(".ico"):
        Image.new("RGB", (16, 16)).save(buf, "ICO")
    else:
        Image.new("RGB", (5000, 1), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,data,status,kind", CASES, ids=[c[0] for c in CASES])
def test_bad_image_named_in_error(live, name, data, status, kind):
    data = _made(name) if data is None else data
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", files=[("images", ("good.jpg", jpeg_bytes(), "image/jpeg")),
                                     ("images", (name, data, "application/octet-stream"))])
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"] == kind and body["image"] == name and name in body["detail"]
        # the same bytes as JSON base64 fail the same way, named by position
        r = c.post("/detect", json={"images": [base64.b64encode(data).decode()]})
        assert r.status_code == status and r.json()["image"] == "images[0]"
        assert c.get("/health").status_code == 200


def test_extreme_aspect_ratio_is_served(live):
    """1 x 5000 px resizes to 1 x 512: thin, but an image; the transform keeps at least one row."""
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", files={"images": ("line.png", _made("line.png"), "image/png")})
        assert r.status_code == 200, r.text
        assert (r.json()["results"][0]["width"], r.json()["results"][0]["height"]) == (5000, 1)


def test_request_limits(live):
    good = ("images", ("g.jpg", jpeg_bytes((64, 48)), "image/jpeg"))
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", files=[good] * 5)
        assert r.status_code == 413 and r.json()["error"] == "too_many_images"
        r = c.post("/detect", files={"images": ("huge.bin", b"\0" * 2_100_000, "application/octet-stream")})
        assert r.status_code == 413 and r.json()["error"] == "request_too_large"

        def streamed():  # no Content-Length: the limit must hold while reading
            for _ in range(30):
                yield b"x" * 100_000

        r = c.post("/detect", content=streamed(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "request_too_large"


@pytest.mark.parametrize("kwargs,status,kind", [
    ({"content": b"plain", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ({"json": {"images": []}}, 422, "invalid_request"),
    ({"json": {"pictures": ["AAAA"]}}, 422, "invalid_request"),
    ({"json": {"images": ["@@not base64@@"]}}, 400, "bad_base64"),
    ({"json": {"images": ["AAAA"], "names": ["a", "b"]}}, 422, "invalid_request"),
    ({"files": {"other": ("x.jpg", b"123", "image/jpeg")}}, 400, "no_images"),
    ({"data": {"images": "not a file"}, "files": {"z": ("z", b"", "text/plain")}}, 422, "not_a_file"),
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg")}, "data": {"score_threshold": "high"}}, 422,
     "invalid_request"),
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg")}, "data": {"score_threshold": "1.5"}}, 422,
     "invalid_request"),
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg")}, "data": {"max_detections": "0"}}, 422,
     "invalid_request"),
    ({"content": b"--b\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400,
     "bad_multipart"),  # no boundary
    ({"content": b"--b\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400,
     "no_images"),
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg"), "score_threshold": ("s.txt", b"0.5", "text/plain")}},
     422, "invalid_request"),  # a text field sent as a file
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg")}, "data": {"classes": "a" * ((1 << 20) + 1)}}, 400,
     "bad_multipart"),  # a text field over 1 MB
    ({"files": {"images": ("x.jpg", b"123", "image/jpeg")}, "data": {f"f{i}": "x" for i in range(65)}}, 400,
     "bad_multipart"),  # over 64 text fields
    ({"content": b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "bad_multipart"),  # a part with no name
])
def test_malformed_requests(live, kwargs, status, kind):
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind


def test_multipart_names_and_fields_as_clients_send_them(live):
    """A file with an empty filename is named by its field and index; the last of a repeated text
    field wins; classes repeat or are comma-separated; a non-UTF-8 filename is read as Latin-1."""
    body = (b'--b\r\nContent-Disposition: form-data; name="images"; filename=""\r\n\r\n' + jpeg_bytes()
            + b'\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="caf\xe9.jpg"\r\n\r\n'
            + jpeg_bytes() + b'\r\n--b\r\nContent-Disposition: form-data; name="max_detections"\r\n\r\n50'
            + b'\r\n--b\r\nContent-Disposition: form-data; name="max_detections"\r\n\r\n1\r\n--b--\r\n')
    with httpx.Client(base_url=live, timeout=60) as c:
        r = c.post("/detect", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == ["images[0]", "caf\u00e9.jpg"]
    assert all(len(x["detections"]) <= 1 for x in results)


def test_server_still_serves_after_abuse(live):
    with httpx.Client(base_url=live, timeout=60) as c:
        for data in (b"", b"junk", _truncated_jpeg(), _png_header_only(30_000, 30_000)):
            assert 400 <= c.post("/detect", files={"images": ("x", data, "image/jpeg")}).status_code < 500
        r = c.post("/detect", files={"images": ("ok.jpg", jpeg_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0]["image"] == "ok.jpg"
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics
