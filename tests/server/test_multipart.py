"""POST /detect's multipart parsing: the plain shape clients send is parsed by a few bytes.find calls
(server/inputs.py, _plain_parts); everything else by python-multipart. Where the first gives parts,
they must be python-multipart's: on the bodies real clients write, and on thousands of mutated ones."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from server.inputs import MAX_FIELD_BYTES, _Form, _multipart_params, _plain_parts, _TooManyFiles


def _reference(body: bytes, ctype: str, max_files: int = 16):
    """python-multipart's parts, or the class of its error."""
    try:
        return _Form(body, ctype, max_files, plain=False).parts
    except ValueError as e:
        return type(e)


def _plain(body: bytes, ctype: str, max_files: int = 16):
    boundary, charset = _multipart_params(ctype)
    return _plain_parts(body, boundary, charset, max_files)


def _httpx_body(files, data=None) -> tuple[bytes, str]:
    """httpx's encoding, with a fixed boundary (its own is random: the same bodies every run)."""
    request = httpx.Request("POST", "http://x/detect", files=files, data=data,
                            headers={"Content-Type": "multipart/form-data; boundary=9bc00517c2034ad5010b5d52a4eae5e0"})
    return request.read(), request.headers["content-type"]


JPEG = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n" + b"\xff\xd9"  # binary, CRLFs, dashes


def _client_bodies() -> list[tuple[str, bytes, str]]:
    out = []
    body, ctype = _httpx_body([("images", ("a.jpg", JPEG, "image/jpeg"))])
    out.append(("httpx, one file", body, ctype))
    body, ctype = _httpx_body([("images", ("a.jpg", JPEG, "image/jpeg")), ("images", ("b 2.jpg", b"", "image/jpeg"))],
                              data={"score_threshold": "0.3", "classes": ["person", "dog,cat"]})
    out.append(("httpx, two files and fields", body, ctype))
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"  # a browser's FormData
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"photo.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + JPEG + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"max_detections\"\r\n\r\n5"
            f"\r\n--{boundary}--\r\n").encode()
    out.append(("browser FormData", body, f"multipart/form-data; boundary={boundary}"))
    body = (b"--xyz\r\ncontent-disposition: form-data; name=\"image\"; filename=\"\"\r\n\r\n" + JPEG
            + b"\r\n--xyz--")  # lower-case header name, empty filename, no CRLF after the end
    out.append(("curl-like, empty filename", body, "multipart/form-data; boundary=xyz"))
    return out


@pytest.mark.parametrize(("what", "body", "ctype"), [pytest.param(*case, id=case[0]) for case in _client_bodies()])
def test_client_bodies_take_the_plain_path_and_get_python_multipart_s_parts(what, body, ctype):
    plain = _plain(body, ctype)
    assert plain is not None, what
    assert plain == _reference(body, ctype)
    assert _Form(body, ctype, 16).parts == plain


def _mutate(rng: np.random.Generator, body: bytes) -> bytes:
    """One to three edits: a byte changed, removed or inserted (often one multipart cares about), a
    cut, a header's letters' case, or a slice doubled."""
    b = bytearray(body)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, len(b) + 1))
        kind = int(rng.integers(0, 6))
        special = [ord(c) for c in '\r\n-";= ']
        if kind == 0 and i < len(b):
            b[i] = int(rng.choice(special)) if rng.random() < 0.7 else int(rng.integers(0, 256))
        elif kind == 1 and i < len(b):
            del b[i]
        elif kind == 2:
            b[i:i] = bytes([int(rng.choice(special))])
        elif kind == 3:
            del b[i:]
        elif kind == 4:
            j = min(len(b), i + int(rng.integers(1, 30)))
            b[i:j] = bytes(b[i:j]).swapcase()
        else:
            j = min(len(b), i + int(rng.integers(1, 60)))
            b[i:i] = b[i:j]
    return bytes(b)


def test_mutated_bodies_get_python_multipart_s_parts_or_go_to_it():
    """Whatever a client sends: the plain path gives python-multipart's parts or steps aside."""
    rng = np.random.default_rng(0)
    taken = 0
    cases = _client_bodies()
    for n in range(4000):
        _, body, ctype = cases[n % len(cases)]
        mutated = _mutate(rng, body)
        plain = _plain(mutated, ctype)
        if plain is not None:
            taken += 1
            assert plain == _reference(mutated, ctype), mutated
    assert 200 < taken < 3800  # both ways taken often: the comparison above is not empty


def test_limits_are_python_multipart_s_errors():
    """More files than allowed, too many fields, a field too large: the plain path steps aside and
    the error is the one python-multipart's path raises."""
    body, ctype = _httpx_body([("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(3)])
    assert _plain(body, ctype, max_files=2) is None
    with pytest.raises(_TooManyFiles):
        _Form(body, ctype, 2)
    body, ctype = _httpx_body([("images", ("a.jpg", JPEG, "image/jpeg"))], data={"classes": "x" * (MAX_FIELD_BYTES + 1)})
    assert _plain(body, ctype) is None
    with pytest.raises(ValueError, match="exceeds"):
        _Form(body, ctype, 16)
    body, ctype = _httpx_body([("images", ("a.jpg", JPEG, "image/jpeg"))], data={"classes": [str(i) for i in range(65)]})
    assert _plain(body, ctype) is None
    with pytest.raises(ValueError, match="form fields"):
        _Form(body, ctype, 16)
