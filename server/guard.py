"""Read deadlines and a connection cap: what a slow or greedy client may hold of the server.

Uvicorn (0.54) has no deadline for a request's headers or body, and its `limit_concurrency`
refuses with a text/plain 503 after counting connections and tasks together, so:

    BodyDeadline        ASGI middleware: the whole body within `body_timeout_s` of the headers,
                        else 408 (JSON) and the connection is closed.
    guarded_protocol()  uvicorn's httptools protocol plus: headers within `header_timeout_s` of their
                        first byte (or of the connection) else 408 and close; at most
                        `max_header_bytes` of them (431); past `max_connections` open connections
                        a JSON 503 with Retry-After, then close; unparsable HTTP a JSON 400
                        (uvicorn's is text/plain); each response's headers leave with its
                        body, in one write (HeldHeaders).
    uvicorn_options()   the uvicorn.Config keywords that wire these from Settings (python -m server
                        and the tests use the same ones).

The keep-alive wait between requests stays uvicorn's own (`timeout_keep_alive`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def _error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail, "image": None}).encode()


def _raw_response(status: int, error: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response for the protocol layer, where no ASGI send exists yet."""
    body = _error_body(error, detail)
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))) + body


class BodyDeadline:
    """Pure ASGI: a request's body must arrive within `timeout_s` of its headers. When it does not,
    the client gets a 408 and the connection is closed; the app sees the client as gone
    (http.disconnect) and whatever it answers then is dropped."""

    def __init__(self, app: Any, *, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = started = answered = False

        async def guarded_receive() -> dict:
            nonlocal body_done, answered
            if answered:
                return {"type": "http.disconnect"}
            if body_done:  # waiting for a disconnect, say: no deadline once the body is in
                return await receive()
            try:
                message = await _within(receive(), deadline)
            except asyncio.TimeoutError:
                if not started:
                    answered = True
                    await _send_408(send, self.timeout_s)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


async def _within(awaitable: Any, deadline: float) -> Any:
    """`awaitable` by the event loop's time `deadline`, else asyncio.TimeoutError. On Python 3.11+
    asyncio.timeout_at runs it in the calling task; wait_for (3.10) wraps it in a task of its own,
    one more event-loop turn for every body chunk."""
    if hasattr(asyncio, "timeout_at"):
        async with asyncio.timeout_at(deadline):
            return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


async def _send_408(send: Any, timeout_s: float) -> None:
    body = _error_body("request_timeout", f"request body not received within {timeout_s:g}s")
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse_connection(scope: dict, receive: Any, send: Any) -> None:
    """The app a connection past the cap gets: one JSON 503, then the connection closes."""
    body = _error_body("too_many_connections", "the server's connection limit is reached, retry later")
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class HeldHeaders:
    """A response cycle's view of its connection's transport: the status line and headers of the
    response are held and go out with its first body write, one segment. uvicorn writes them
    separately, so the client woke twice per response (once for the headers, once for the body).
    Writes before the response starts (100 Continue) pass at once; a response that ends without a
    body write (HEAD, 204) is flushed when it completes (`flush`, from on_response_complete) or
    when its connection is closed."""

    def __init__(self, transport: Any, cycle: Any) -> None:
        self._transport, self._cycle = transport, cycle
        self._held: bytes | None = None
        self._holding_done = False  # the header block was seen: everything else passes

    def write(self, data: bytes) -> None:
        if not self._holding_done and self._cycle.response_started:
            self._holding_done = True
            self._held = bytes(data)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...
        return getattr(self._transport, name)


def guarded_protocol(*, header_timeout_s: float, max_header_bytes: int, max_connections: int) -> type:
    """uvicorn's HttpToolsProtocol with header deadline, header size limit and connection cap."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._awaiting_headers, self._header_bytes, self._tail = True, 0, b""
            # `connections` is shared by every connection of the server and already holds this one
            self._refused = len(self.connections) > max_connections
            self._arm()  # a connection that never sends a byte is cut too (quietly)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers and not self._headers_fit(data):
                return
            super().data_received(data)

        def _headers_fit(self, data: bytes) -> bool:
            """Count header bytes before the parser buffers them (httptools holds a header until
            its end arrives); past the limit answer 431 and close."""
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            size = self._header_bytes + (len(data) if end < 0 else max(0, end + 4 - len(self._tail)))
            if size > max_header_bytes:
                self._reply_and_close(431, "headers_too_large", f"request headers over {max_header_bytes} bytes")
                return False
            self._header_bytes, self._tail = (size, seen[-3:]) if end < 0 else (0, b"")
            return True

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # from this request's first byte (the wait before it is uvicorn's keep-alive)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._disarm()
            if self._refused:
                self.app = _refuse_connection  # this connection's app only
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = HeldHeaders(self.transport, self.cycle)

        def on_response_complete(self) -> None:
            if self.cycle is not None and isinstance(self.cycle.transport, HeldHeaders):
                self.cycle.transport.flush()
            super().on_response_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers, self._header_bytes, self._tail = True, 0, b""  # the next request's

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to unparsable HTTP, as JSON
            self._reply_and_close(400, "bad_http", msg)

        def _reply_and_close(self, status: int, error: str, detail: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, error, detail))
                self.transport.close()

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting_headers:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # a pipelined request stalls behind a response: close after it
                return
            if self._header_bytes or self._tail:
                self._reply_and_close(408, "request_timeout",
                                      f"request headers not received within {header_timeout_s:g}s")
            else:
                self.transport.close()

    return GuardedHttpToolsProtocol


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvicorn.Config keywords for `settings`: the guarded protocol where httptools is installed
    (uvicorn[standard]); otherwise h11 with its own header size limit and uvicorn's concurrency
    limit, and no header deadline."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        log.warning("httptools not installed: no header deadline, text/plain refusals (pip install 'uvicorn[standard]')")
        return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes,
                "limit_concurrency": settings.max_connections}
    return {"http": guarded_protocol(header_timeout_s=settings.header_timeout_s,
                                     max_header_bytes=settings.max_header_bytes,
                                     max_connections=settings.max_connections)}
