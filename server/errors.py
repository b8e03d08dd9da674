"""One JSON error shape for every client and server error: {"error", "detail", "image"}.

No response of this app is a text/plain 500: a parse error that escapes a route is the client's 400,
anything else a JSON 500 (logged)."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.images import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

# Raised only by parsing what a client sent (a body, a header, a query string): the client's 400.
PARSE_ERRORS: tuple[type[BaseException], ...] = (RecursionError, UnicodeDecodeError, json.JSONDecodeError)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, *, image: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.image, self.headers = status, error, detail, image, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "detail": self.detail, "image": self.image},
                            status_code=self.status, headers=self.headers)


# Decoding failures are the client's: never a 5xx.
_IMAGE_ERRORS: tuple[tuple[type[ImageError], int, str], ...] = (
    (EmptyImageError, 400, "empty_image"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (CorruptImageError, 422, "corrupt_image"),
    (ImageTooLargeError, 413, "image_too_large"),
)


def image_error(exc: ImageError, image: str) -> ApiError:
    for cls, status, kind in _IMAGE_ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, kind, f"{image}: {exc}", image=image)
    return ApiError(422, "bad_image", f"{image}: {exc}", image=image)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": str(exc.detail), "image": None},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": "; ".join(parts), "image": None},
                            status_code=422)

    async def _parse_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "bad_request", "detail": f"cannot parse the request: {type(exc).__name__}",
                             "image": None}, status_code=400)

    for cls in PARSE_ERRORS:
        app.add_exception_handler(cls, _parse_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware calls this, then re-raises: uvicorn logs the traceback.
        return JSONResponse({"error": "internal_error", "detail": "internal server error", "image": None},
                            status_code=500)
