"""Server overhead per 640x480 JPEG, broken down by stage (not a test).

    python -m benchmarks.overhead [--model PATH] [--backend torch] [--requests 200] [--json FILE]
                                  [--against GIT_REF [--block 50]] [--no-floors]

Three clients take turns, one image per request, requests one after another (no batching, no
queueing), against `python -m server` started here: "socket" (HTTP/1.1 by hand on a keep-alive
socket, the multipart body encoded once: the server's own cost), "raw" (http.client, which adds
its response parsing) and "httpx" (what a Python user's client adds on top). With --against REF,
before and after instead: the server as of REF (a temporary git worktree) and this checkout's,
both up, the socket client taking turns between them. Per request the server reports its stages in `timing_ms`; the client measures the
whole round trip. Printed, medians over the requests:

    decode        bytes -> (h, w, 3) uint8                      (server, worker pool; a lone photo's
                  decode in bands includes the preprocessing of each band's rows)
    preprocess    normalize + resize + collate (what is left)   (server)
    backend       the model itself                              (server)
    postprocess   class-wise NMS, rescale                       (server)
    http+json     round trip - everything the server timed: HTTP, multipart parsing, the hops
                  between event loop and threads, response building and JSON encoding
    overhead      round trip - backend: what serving adds to the model

Each as median and 10th percentile over the requests (per column, so the rows need not add up).

Beside them, taking turns with the server's requests, the floors: what each part costs alone on
these cores, the same photos. Decode (in two bands, each thread preprocessing the rows it decoded, as
an idle server decodes; then, for comparison and not in the sum, the same photo decoded on one
thread and preprocessed after, as a busy server does),
preprocess (what is left of it: the rows that read both bands, the padding, the batch) and postprocess in this process, one call at a
time, with warm caches: the model's outputs computed beforehand ("alone"); the HTTP round trip of the same bodies, by
the same socket client, to a bare ASGI app on uvicorn with httptools and uvloop (the server's
stack) that reads the body and answers a response the server gave ("bare"). Their sum is what a server with no cost of its
own would add; "serving's own" is the overhead above it: FastAPI and the middleware, multipart
parsing, the hand-offs between the event loop and the threads, caches cold after the model ran.
(--no-floors skips them; with --against they are not run.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.server_load import COCO, ROOT, add_server_options, free_port, served, wait_ready

STAGES = ("decode", "preprocess", "queue", "inference", "postprocess")


def photos_640x480(limit: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for p in sorted(COCO.glob("*.jpg")):
        with Image.open(p) as im:
            if im.size == (640, 480):
                out.append((p.name, p.read_bytes()))
        if len(out) == limit:
            break
    return out


def multipart_body(name: str, data: bytes, boundary: str = "frcnnbench7d3f") -> tuple[bytes, str]:
    """One `images` part, encoded once: the raw client sends these bytes as they are."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class RawClient:
    """http.client on one keep-alive connection, bodies encoded beforehand: what the server costs
    without a client library's own per-request work (httpx spends about a millisecond per request
    building the multipart body and the response object, which is the client's, not the server's)."""

    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)

    def post(self, body: bytes, ctype: str) -> dict:
        self.conn.request("POST", "/detect", body=body, headers={"Content-Type": ctype})
        r = self.conn.getresponse()
        payload = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.conn.close()


class SocketClient:
    """HTTP/1.1 written and read by hand on one keep-alive socket: no client library at all, so the
    round trip is the server's own cost plus the loopback (http.client's response parsing, through
    the email package, is about 0.25 ms of its own per request here)."""

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.addr = (u.hostname, u.port)
        self.host = f"{u.hostname}:{u.port}".encode()
        self._connect()

    def _connect(self) -> None:
        import socket

        self.sock = socket.create_connection(self.addr, timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, body: bytes, ctype: str, retry: bool = True) -> dict:
        buf = b""
        try:
            self.sock.sendall(b"POST /detect HTTP/1.1\r\nHost: " + self.host + b"\r\nContent-Type: "
                              + ctype.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                              + b"\r\n\r\n" + body)
            while b"\r\n\r\n" not in buf:
                buf += self._recv()
        except (RuntimeError, ConnectionError):
            if buf or not retry:
                raise
            # idle past the server's keep-alive timeout (another server's --block turn): reconnect
            self.sock.close()
            self._connect()
            return self.post(body, ctype, retry=False)
        head, _, payload = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                      if k.strip().lower() == b"content-length")
        while len(payload) < length:
            payload += self._recv()
        if not lines[0].startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{lines[0]!r}: {payload[:200]!r}")
        return json.loads(payload)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def measure(posts: dict[str, Callable[[int], dict]], requests: int, block: int = 1) -> dict:
    """posts: label -> post(i) (request i, returns the response's timing_ms), taking turns request by
    request (in alternating order) so load hits all alike: p50 and p10 of every stage the server
    reports, the round trip, http+json and overhead, per label.

    block > 1: turns of `block` requests per label instead, the first two of each turn not counted.
    For servers whose threads differ in what they do between requests: a model's worker threads may
    spin on the cores for milliseconds after a run, slowing whichever server is timed next. Request
    by request that penalises the server that does not spin, so two servers that differ there are
    compared block by block (--against ... --block 50), each alone on the cores."""
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in posts}
    order, sent = list(posts), dict.fromkeys(posts, 0)
    skip = 2 if block > 1 else 0
    warm = 10 if block == 1 else block  # first calls of each path allocate
    turn = 0
    while min(len(rs) for rs in rows.values()) < requests:
        for label in order if turn % 2 else order[::-1]:
            for j in range(block + skip):
                i = sent[label]
                sent[label] += 1
                t0 = time.perf_counter()
                timing = posts[label](i)
                total = (time.perf_counter() - t0) * 1e3
                if i < warm or j < skip:
                    continue
                row = {k: float(timing[k]) for k in STAGES}
                if "decode_whole" in timing:  # the floors' extra column
                    row["decode_whole"] = float(timing["decode_whole"])
                row["round_trip"] = total
                row["http+json"] = total - sum(row[k] for k in STAGES)
                row["overhead"] = total - row["inference"]
                rows[label].append(row)
        turn += 1
    rows = {label: rs[:requests] for label, rs in rows.items()}
    # Median and 10th percentile: on a shared machine the low percentile is the cost itself, the
    # median adds the neighbours' interference (waits for a core between threads).
    return {label: {"p50": {k: statistics.median(r[k] for r in rs) for k in rs[0]},
                    "p10": {k: float(np.percentile([r[k] for r in rs], 10)) for k in rs[0]}}
            for label, rs in rows.items()} | {"loadavg": os.getloadavg()[0]}


def raw_post(url: str, photos: list[tuple[str, bytes]], client_type: type = RawClient
             ) -> tuple[Callable[[int], dict], RawClient | SocketClient]:
    bodies = [multipart_body(name, data) for name, data in photos]
    client = client_type(url)
    return (lambda i: client.post(*bodies[i % len(bodies)])["timing_ms"]), client


def httpx_post(client, photos: list[tuple[str, bytes]]) -> Callable[[int], dict]:
    def post(i: int) -> dict:
        name, data = photos[i % len(photos)]
        r = client.post("/detect", files={"images": (name, data, "image/jpeg")})
        r.raise_for_status()
        return r.json()["timing_ms"]
    return post


@contextlib.contextmanager
def worktree(ref: str):
    """A temporary git worktree of this repository at `ref` (removed afterwards)."""
    path = Path(tempfile.mkdtemp(prefix="frcnn-against-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), ref], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path.parent, ignore_errors=True)


async def bare_app(scope: dict, receive: Callable, send: Callable) -> None:
    """The HTTP floor: reads the whole body, answers the bytes of $FRCNN_BENCH_BARE_BODY (a file)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_BARE_BODY)).encode())]})
    await send({"type": "http.response.body", "body": _BARE_BODY})


# read once where uvicorn imports this module for bare_app (bare_server sets the variable)
_BARE_BODY = Path(os.environ["FRCNN_BENCH_BARE_BODY"]).read_bytes() if "FRCNN_BENCH_BARE_BODY" in os.environ else b""


@contextlib.contextmanager
def bare_server(response: bytes):
    """uvicorn serving bare_app (httptools, uvloop: the server's protocol and loop) on a free port."""
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(response)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.overhead:bare_app", "--port", str(port),
                                 "--http", "httptools", "--loop", "uvloop", "--log-level", "warning",
                                 "--no-access-log"], cwd=ROOT, env={**os.environ, "FRCNN_BENCH_BARE_BODY": str(body_file)})
        def accepting() -> bool:  # OSError until uvicorn listens
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

        try:
            wait_ready(proc, accepting, "bare server", 60)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)


def alone_post(args: argparse.Namespace, photos: list[tuple[str, bytes]]) -> Callable[[int], dict]:
    """post(i) for measure() without a server: photo i decoded, prepared and postprocessed here, each
    stage timed (ms) as the server reports them. The model's outputs are computed once per photo
    beforehand: a model run here between the requests would leave this process's threads spinning
    on the cores the servers need."""
    import torch

    from runtime import Pipeline
    from runtime.images import load_image

    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, backend=args.backend, threads=args.threads)
    raws = [pipe.infer(pipe.collate([pipe.prepare(load_image(data))])) for _, data in photos]

    def post(i: int) -> dict:
        t0 = time.perf_counter()
        bands = pipe.bands()  # as an idle server decodes: in two bands, each preprocessing its rows
        image = load_image(photos[i % len(photos)][1], threads=2, after=None if bands is None else bands.rows)
        t1 = time.perf_counter()
        batch = pipe.collate([pipe.prepare(image, bands)])
        t2 = time.perf_counter()
        pipe.postprocess(raws[i % len(photos)], batch, pipe.options())
        t3 = time.perf_counter()
        # side by side: the same photo decoded on one thread, then preprocessed (a busy server's path)
        pipe.collate([pipe.prepare(load_image(photos[i % len(photos)][1], threads=1))])
        t4 = time.perf_counter()
        return {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "queue": 0.0, "inference": 0.0,
                "postprocess": (t3 - t2) * 1e3, "decode_whole": (t4 - t3) * 1e3}
    return post


def floors(res: dict) -> dict[str, dict[str, float]]:
    """The floors (see the module docstring) from measure()'s "alone" and "bare" columns."""
    out = {k: {q: res["alone"][q][k] for q in ("p50", "p10")} for k in ("decode", "preprocess", "postprocess")}
    out["http"] = {q: res["bare"][q]["round_trip"] for q in ("p50", "p10")}
    out["sum"] = {q: sum(out[k][q] for k in ("decode", "preprocess", "postprocess", "http")) for q in ("p50", "p10")}
    out["decode_whole"] = {q: res["alone"][q]["decode_whole"] for q in ("p50", "p10")}  # not in the sum
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "demo-tiny-shapes")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--url")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--against", metavar="GIT_REF", help="before/after: also serve the code as of GIT_REF")
    ap.add_argument("--no-floors", action="store_true", help="skip the floors (each part alone)")
    ap.add_argument("--block", type=int, default=1,
                    help="take turns in blocks of this many requests (see measure(); 50 for --against when "
                         "the two versions' model threads differ in spinning between runs)")
    add_server_options(ap)
    args = ap.parse_args(argv)

    photos = photos_640x480(16)
    if args.against:
        with worktree(args.against) as tree, served(args, args.model, cwd=tree) as (_, before_url), \
                served(args, args.model) as (_, after_url):
            before, c1 = raw_post(before_url, photos, SocketClient)
            after, c2 = raw_post(after_url, photos, SocketClient)
            labels = (f"before {args.against}", "after")
            res = measure(dict(zip(labels, (before, after), strict=True)), args.requests, args.block)
            c1.close()
            c2.close()
    else:
        import httpx

        with served(args, args.model) as (_, url), httpx.Client(base_url=url, timeout=120) as hc, \
                contextlib.ExitStack() as stack:
            raw, c = raw_post(url, photos)
            sock, c2 = raw_post(url, photos, SocketClient)
            labels = ("socket", "raw", "httpx")
            posts = {"socket": sock, "raw": raw, "httpx": httpx_post(hc, photos)}
            if not (args.no_floors or args.url):  # taking turns with the server's requests
                response = hc.post("/detect", files={"images": photos[0]}).content  # the bare app's answer
                bare, c3 = raw_post(stack.enter_context(bare_server(response)), photos, SocketClient)
                stack.callback(c3.close)

                def bare_post(i: int) -> dict:  # its answer's timing_ms is the server's, not its own
                    bare(i)
                    return dict.fromkeys(STAGES, 0.0)

                posts["bare"] = bare_post
                posts["alone"] = alone_post(args, photos)
            res = measure(posts, args.requests, args.block)
            c.close()
            c2.close()
    print(f"{args.requests} sequential requests per server/client, one 640x480 JPEG each ({len(photos)} "
          f"COCO128 photos), ms (load average {res['loadavg']:.1f} on {os.cpu_count()} cores):")
    print(f"  {'':12s} " + " ".join(f"{label + ' ' + q:>{max(10, len(label) + 4)}s}"
                                    for label in labels for q in ("p50", "p10")))
    for k in ("decode", "preprocess", "queue", "inference", "postprocess", "http+json", "round_trip", "overhead"):
        print(f"  {k:12s} " + " ".join(f"{res[label][q][k]:>{max(10, len(label) + 4)}.2f}"
                                        for label in labels for q in ("p50", "p10")))
    if "bare" in res:
        res["floors"] = floors(res)
        f, own = res["floors"], res["socket"]
        print("  floors, each part alone (same photos, socket client for HTTP):")
        for k, what in (("decode", "decode + band preprocessing, 2 bands"), ("preprocess", "rest of preprocess + collate"),
                        ("postprocess", "postprocess (warm)"),
                        ("http", "HTTP round trip, bare ASGI app on uvicorn"), ("sum", "sum")):
            print(f"  {what:40s} {f[k]['p50']:>8.2f} {f[k]['p10']:>8.2f}")
        print(f"  {'(decode whole, then preprocess: busy path)':40s} {f['decode_whole']['p50']:>8.2f} "
              f"{f['decode_whole']['p10']:>8.2f}")
        for q in ("p50", "p10"):
            print(f"  {q}: server overhead {own[q]['overhead']:.2f} = floors {f['sum'][q]:.2f} + serving's own "
                  f"{own[q]['overhead'] - f['sum'][q]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
