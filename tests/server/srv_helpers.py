"""Helpers shared by the server tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

COCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128" / "train2017"
CLASS_NAMES = ["__background__", "circle", "square", "triangle"]


def jpeg_bytes(size: tuple[int, int] = (320, 240), colour: tuple[int, int, int] = (120, 80, 200)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, colour)
    ImageDraw.Draw(img).rectangle((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(250, 250, 20))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@contextlib.contextmanager
def serve(settings, app=None, **config) -> Iterator[tuple[str, object]]:
    """Run create_app(settings) (or `app`) under uvicorn in a thread, on a socket bound to 127.0.0.1:0,
    with the uvicorn options python -m server uses (server/guard.py; `config` overrides them).
    Yields (base URL, uvicorn.Server); stopping it runs the app's shutdown (drain)."""
    import uvicorn

    from server import create_app
    from server.guard import uvicorn_options

    app = create_app(settings) if app is None else app
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=30, **{**uvicorn_options(settings), **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:  # the lifespan (model load + warm-up) runs before this flips
        if not thread.is_alive():
            raise RuntimeError("server thread died during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
