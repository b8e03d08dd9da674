"""Running one request's images through the micro-batcher: shared by POST /detect and the Open
Inference Protocol's infer (server/oip.py), so both have the same options, limits and errors.

    jobs = make_jobs(engine, settings, images, score_threshold=..., max_detections=..., classes=...)
    answers = await run_jobs(app.state, jobs)    # list[Answer], one per job, in order; raises ApiError
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runtime.images import ImageError
from server.batcher import MicroBatcher, Overloaded
from server.engine import Answer, Engine, Job
from server.errors import ApiError, image_error

log = logging.getLogger(__name__)


def engine_of(state: Any) -> Engine:
    """The loaded engine, or 503 while loading or stopping."""
    engine = state.engine
    if engine is None or state.draining:
        raise ApiError(503, "not_ready", "model not loaded or server stopping", headers={"Retry-After": "1"})
    return engine


def make_jobs(engine: Engine, settings: Any, images: list[tuple[str, bytes]], *,
              score_threshold: float | None, max_detections: int | None,
              classes: list[str | int] | None) -> list[Job]:
    """One Job per (name, encoded bytes); unset options take the server's defaults."""
    try:
        class_ids = engine.class_ids(classes) if classes else None
    except KeyError as e:
        raise ApiError(422, "unknown_class", str(e.args[0])) from None
    score = settings.score_threshold if score_threshold is None else score_threshold
    top_k = settings.max_detections if max_detections is None else max_detections
    return [Job(name, data, score, top_k, class_ids) for name, data in images]


async def run_jobs(state: Any, jobs: list[Job]) -> list[Answer]:
    """Submit every job (all or none: a request that does not fit the queue is refused whole),
    wait for all answers within the request timeout, and turn the first failure into an ApiError."""
    settings, metrics = state.settings, state.metrics
    batcher: MicroBatcher = state.batcher
    if batcher.queue_size - batcher.depth < len(jobs):
        metrics.rejected.inc(len(jobs))
        raise ApiError(503, "overloaded", "queue full, retry later", headers={"Retry-After": "1"})
    futures = []
    try:
        for job in jobs:
            futures.append(batcher.submit_nowait(job))
    except Overloaded as e:
        for f in futures:
            f.cancel()
        metrics.rejected.inc(len(jobs))
        raise ApiError(503, "overloaded", str(e), headers={"Retry-After": "1"}) from None
    try:
        answers = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                         settings.request_timeout_s)
    except asyncio.TimeoutError:
        metrics.images.labels("timeout").inc(len(jobs))
        raise ApiError(504, "timeout", f"no answer within {settings.request_timeout_s}s") from None
    for job, answer in zip(jobs, answers, strict=True):
        if isinstance(answer, BaseException):
            metrics.images.labels("error").inc()
            if isinstance(answer, ImageError):
                raise image_error(answer, job.name)
            if isinstance(answer, Overloaded):
                raise ApiError(503, "overloaded", str(answer), headers={"Retry-After": "1"})
            log.error("inference failed for %s", job.name, exc_info=answer)
            raise ApiError(500, "inference_error", f"{job.name}: inference failed", image=job.name)
    metrics.images.labels("ok").inc(len(jobs))
    return answers
