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


async def run_jobs(state: Any, jobs: list[Job], request: Any = None) -> list[Answer]:
    """Submit every job (all or none: a request that does not fit the queue is refused whole),
    wait for all answers within the request timeout, and turn the first failure into an ApiError.

    Cost is checked first, from the image headers (no pixel decoded): each image within
    max_pixels, the request within max_request_pixels (413). When the request is answered before
    its work is done (504, 503, the client gone: pass the Starlette `request` to watch for that),
    its images that have not started decoding or inference are cancelled."""
    settings, metrics = state.settings, state.metrics
    batcher: MicroBatcher = state.batcher
    engine: Engine = state.engine
    costs = []
    for job in jobs:
        try:
            costs.append(engine.cost(job))
        except ImageError as e:
            metrics.images.labels("error").inc()
            raise image_error(e, job.name) from None
    budget = settings.request_pixel_budget
    if sum(costs) > budget:
        metrics.refused_pixels.inc()
        raise ApiError(413, "too_many_pixels", f"the request's images decode to {sum(costs)} pixels; "
                       f"the limit per request is {budget}")
    if batcher.queue_size - batcher.depth < len(jobs):
        metrics.rejected.inc(len(jobs))
        raise ApiError(503, "overloaded", "queue full, retry later", headers={"Retry-After": "1"})
    group = object()  # this request: its decodes take turns with other requests', cancelled together
    futures = []
    try:
        try:
            for job, cost in zip(jobs, costs, strict=True):
                futures.append(batcher.submit_nowait(job, group=group, cost=cost))
        except Overloaded as e:
            metrics.rejected.inc(len(jobs))
            raise ApiError(503, "overloaded", str(e), headers={"Retry-After": "1"}) from None
        answers = await _wait(futures, settings.request_timeout_s, request)
        if answers is None:
            metrics.images.labels("timeout").inc(len(jobs))
            raise ApiError(504, "timeout", f"no answer within {settings.request_timeout_s}s")
    finally:
        batcher.cancel_group(group)  # no-op once every answer is in
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


class _ClientGone(Exception):
    pass


class _TimedOut(Exception):
    pass


def _fail(fut: asyncio.Future, error: Exception) -> None:
    if not fut.done():
        fut.set_exception(error)


async def _wait(futures: list[asyncio.Future], timeout_s: float, request: Any) -> list[Any] | None:
    """All answers (exceptions in place), or None on timeout. Raises ApiError 400 when the client
    disconnects first (nobody would read the answer).

    One future, `all_in`, is set by the last answer (or failed by the timer or the disconnect
    watcher) and awaited directly: the request resumes two event-loop turns after its last answer
    (gather + wait took three, and a timeout task more)."""
    if not futures:
        return []
    loop = asyncio.get_running_loop()
    all_in = loop.create_future()
    left = len(futures)

    def one_in(_f: asyncio.Future) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not all_in.done():
            all_in.set_result(None)

    for f in futures:
        f.add_done_callback(one_in)
    gone = asyncio.ensure_future(_client_gone(request, all_in)) if request is not None else None
    timer = loop.call_later(timeout_s, _fail, all_in, _TimedOut())
    try:
        await all_in
    except _TimedOut:
        return None
    except _ClientGone:
        raise ApiError(400, "client_disconnected", "client disconnected before the answer") from None
    finally:
        timer.cancel()
        if gone is not None:
            gone.cancel()
        for f in futures:
            f.remove_done_callback(one_in)
    return [_outcome(f) for f in futures]


def _outcome(f: asyncio.Future) -> Any:
    """A done future's answer, or its exception (a cancelled one's CancelledError) in its place."""
    if f.cancelled():
        return asyncio.CancelledError()
    return f.exception() or f.result()


async def _client_gone(request: Any, all_in: asyncio.Future) -> None:
    """Fails `all_in` when the client closes the connection. The body has been read already, so
    the server's next receive() message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _fail(all_in, _ClientGone())
            return
