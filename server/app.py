"""create_app(settings): the FastAPI app. The model loads and warms up in the lifespan, never at import.

Routes: POST /detect, GET /health, /ready, /metrics, /model, / (page), /docs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from starlette.routing import Match, Route

from server.batcher import MicroBatcher
from server.engine import Engine, Job
from server.errors import ApiError, install_handlers
from server.guard import BodyDeadline
from server.inputs import parse
from server.jobs import engine_of as jobs_engine_of
from server.jobs import make_jobs, run_jobs
from server.metrics import Metrics, method_label
from server.model_source import load_pipeline
from server.oip import include_oip, model_version
from server.openapi import detect_operation, install_openapi
from server.respond import detect_body
from server.sample import SAMPLE_PATH, has_sample
from server.sample import router as sample_router
from server.schemas import (
    DetectResponse,
    ErrorBody,
    Health,
    ModelInfo,
)
from server.settings import Settings

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in (
        (400, "empty image, bad base64 or malformed body"), (401, "missing or wrong X-API-Key"),
        (408, "body not received within body_timeout_s (the connection is closed)"),
        (413, "upload, image pixels or image count over the limit"), (415, "not an image / not a supported type"),
        (422, "truncated or damaged image, invalid option"), (503, "queue full or not ready (see Retry-After)"),
        (504, "request timed out"),
    )
}

def create_app(settings: Settings | None = None, *, pipeline: Any = None) -> FastAPI:
    """The app. `pipeline`: serve this runtime.Pipeline-like object instead of loading settings.model
    (the seam contract tests use to run the real app without a model)."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        pipe = pipeline if pipeline is not None else await asyncio.to_thread(load_pipeline, settings)
        engine = Engine(pipe, max_pixels=settings.max_pixels, mixed_batches=settings.batch_mixed_sizes,
                        decode_bands=settings.decode_bands)
        warm_s = await asyncio.to_thread(engine.warmup)
        log.info("model %s (%s) warmed up in %.2fs", engine.model_name, engine.backend_name, warm_s)
        batch_size = settings.max_batch_size
        if settings.batch_autotune and batch_size > 1:
            batch_size, per_image = await asyncio.to_thread(engine.tune_batch_size, batch_size)
            log.info("batch size %d of at most %d (backend seconds per image by batch size: %s)", batch_size,
                     settings.max_batch_size, ", ".join(f"{b}: {s:.4f}" for b, s in per_image.items()))
        metrics.max_batch_size.set(batch_size)
        engine.on_backend = metrics.backend.observe

        def prepare(job: Job):
            t0 = time.perf_counter()
            try:
                return engine.prepare(job, alone=batcher.alone())
            finally:
                metrics.preprocess.observe(time.perf_counter() - t0)

        batcher = MicroBatcher(prepare=prepare, handle=engine.handle, key=engine.batch_key,
                               max_batch_size=batch_size, max_delay_s=settings.max_delay_ms / 1000.0,
                               queue_size=settings.queue_size, workers=settings.workers,
                               large_cost=settings.large_decode_pixels, cost_budget=settings.decode_pixel_budget,
                               infer_threads=settings.inference_threads, wait_when_idle=settings.wait_when_idle,
                               on_batch=metrics.observe_batch,
                               on_cancel=lambda stage, n: metrics.cancelled.labels(stage).inc(n))
        await batcher.start()
        metrics.watch(batcher)
        state.engine, state.batcher, state.draining = engine, batcher, False
        metrics.ready.set(1)
        try:
            yield
        finally:
            # Uvicorn has already waited for in-flight requests; answer anything still queued.
            state.draining = True
            metrics.ready.set(0)
            await batcher.stop(timeout_s=settings.request_timeout_s)
            log.info("server stopped: queue drained")

    app = FastAPI(title="frcnn", version="0.1.0", lifespan=lifespan,
                  description="Faster R-CNN object detection. POST images to /detect.")
    app.state.settings, app.state.metrics = settings, metrics
    app.state.engine = app.state.batcher = None
    app.state.draining = False
    install_handlers(app)
    install_openapi(app, settings)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)  # inside metrics: its 408s counted
    app.add_middleware(_MetricsMiddleware, metrics=metrics, router=app.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required when the server has an api_key")

    async def require_key(key: str | None = Depends(key_header)) -> None:  # async: no threadpool hop
        # bytes: compare_digest refuses non-ASCII str, and a client's odd header must stay a 401
        if settings.api_key and not (key and secrets.compare_digest(key.encode(), settings.api_key.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header",
                           headers={"WWW-Authenticate": "X-API-Key"})

    def engine_of(request: Request) -> Engine:
        return jobs_engine_of(request.app.state)

    @app.post("/detect", response_model=DetectResponse, responses=_ERRORS, openapi_extra=detect_operation(settings),
              dependencies=[Depends(require_key)], summary="Detect objects in one or more images")
    async def detect(request: Request) -> DetectResponse:
        t_start = time.perf_counter()
        engine = engine_of(request)
        inp = await parse(request, max_upload_bytes=settings.max_upload_bytes,
                          max_images=settings.max_images_per_request, check_classes=engine.class_ids)
        jobs = make_jobs(engine, settings, inp.images, score_threshold=inp.score_threshold,
                         max_detections=inp.max_detections, classes=inp.classes)
        answers = await run_jobs(request.app.state, jobs, request)
        # Encoded here once (orjson), not validated again by FastAPI: DetectResponse's shape.
        return Response(detect_body(engine, answers, t_start), media_type="application/json")

    async def detect_route(request: Request) -> Response:
        await require_key(request.headers.get("x-api-key"))
        return await detect(request)

    # POST /detect is served by a plain Starlette route placed before the FastAPI one, which stays
    # for the OpenAPI document: FastAPI's per-request handler (dependency solving, its exit stack,
    # telemetry hooks) cost about 0.15 ms of the request for a handler that takes no parameters.
    # Same errors: ApiError and HTTPException go to the same app-level handlers.
    app.router.routes.insert(0, Route("/detect", detect_route, methods=["POST"], include_in_schema=False))

    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> Health:
        return Health(status="ok")

    @app.get("/ready", response_model=Health, responses={503: {"model": ErrorBody}},
             summary="Readiness: model loaded and warmed up, not shutting down")
    async def ready(request: Request) -> Any:
        if request.app.state.engine is None or request.app.state.draining:
            return JSONResponse({"error": "not_ready", "detail": "loading or stopping", "image": None},
                                status_code=503, headers={"Retry-After": "1"})
        return Health(status="ready")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/model", response_model=ModelInfo, dependencies=[Depends(require_key)],
             summary="Model name, classes, backend and input settings")
    async def model_info(request: Request) -> ModelInfo:
        engine = engine_of(request)
        return ModelInfo(name=engine.model_name, backend=engine.backend_name, classes=engine.class_names,
                         input=_jsonable(engine.input_settings), max_batch_size=request.app.state.batcher.max_batch_size,
                         score_threshold=settings.score_threshold, max_detections=settings.max_detections,
                         version=model_version(engine), precision=str(getattr(engine.pipe, "precision", "fp32")),
                         sample=SAMPLE_PATH if has_sample(engine.class_names) else None)

    include_oip(app, require_key=require_key)  # /v2/...: Open Inference Protocol on the same batcher
    app.include_router(sample_router)  # /sample.png

    page = resources.files("server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


class _MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): requests by route template, method and status,
    latency. Every label has a bounded set of values: routes are templates (or "unmatched"),
    methods outside HTTP's usual ones are "other"."""

    def __init__(self, app: Any, metrics: Metrics, router: Any) -> None:
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = _route_label(scope, self.router)
            self.metrics.requests.labels(path, method_label(scope.get("method", "")), str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


def _route_label(scope: dict, router: Any) -> str:
    """The matched route's template. FastAPI's routes put themselves in the scope; Starlette's
    plain routes (/docs, /openapi.json) do not, so they are matched here (a 405 keeps its route)."""
    route = scope.get("route")
    if route is None:
        for candidate in router.routes:
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"
