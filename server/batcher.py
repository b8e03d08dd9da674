"""Micro-batcher: many concurrent requests -> few batched backend calls.

    submit(item) --prepare(item) in the worker pool, started at once--> bounded asyncio.Queue
    collector task: first item, then whatever is queued, then (only under load, see _collect)
                    more until max_batch_size or max_delay after the first
                    -> await their prepare results -> handle(list) in the single inference thread
                    -> answers split back to each submitter's future

Contract of `handle` (as Ray Serve / Triton batch handlers): it takes a list of prepared items
and returns a list of the same length, each entry an answer or an Exception for that item only.
If `handle` raises for the whole batch, each item is retried alone so that one bad item fails
only itself. Items whose `prepare` failed never reach `handle`.

The queue is bounded: a full queue raises `Overloaded` at submit (the server answers 503 with
Retry-After). `stop()` refuses new items and drains what was accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Prep = TypeVar("Prep")
Out = TypeVar("Out")


class Overloaded(RuntimeError):
    """The queue is full or the batcher is shutting down; retry later."""


@dataclass
class BatchStats:
    """What one backend call looked like (for metrics)."""

    size: int
    handle_s: float
    queue_depth: int


@dataclass
class _Job:
    prepared: asyncio.Future  # result of prepare(item), resolved in the worker pool
    answer: asyncio.Future  # what submit() returns
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[In, Prep, Out]):
    def __init__(self, *, prepare: Callable[[In], Prep],
                 handle: Callable[[list[Prep]], Sequence[Out | BaseException]],
                 max_batch_size: int = 8, max_delay_s: float = 0.01, queue_size: int = 64,
                 workers: int = 2, on_batch: Callable[[BatchStats], None] | None = None,
                 prepare_executor: Executor | None = None) -> None:
        if max_batch_size < 1 or queue_size < 1 or workers < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size, queue_size, workers >= 1 and max_delay_s >= 0 required")
        self.prepare = prepare
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._own_pool = prepare_executor is None
        self._pool = prepare_executor or ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        # One thread: backends are not re-entrant and a batch should own all intra-op threads.
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._under_load = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new items, answer every accepted one, then stop the collector and pools."""
        self._accepting = False
        if self._task is not None and self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout_s)  # every job task_done()
            except asyncio.TimeoutError:
                log.warning("batcher: %d items not drained within %.1fs", self.depth, timeout_s)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._fail_pending(Overloaded("server shutting down"))
        self._infer_pool.shutdown(wait=True)
        if self._own_pool:
            self._pool.shutdown(wait=True)

    def _fail_pending(self, exc: BaseException) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.answer.done():
                job.answer.set_exception(exc)

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not the batch being run)."""
        return self._queue.qsize() if self._queue is not None else 0

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, item: In) -> Out:
        """Queue one item and wait for its answer (raises its per-item exception)."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: In) -> asyncio.Future:
        """Queue one item; return the future of its answer. Raises Overloaded when full."""
        if not self._accepting or self._queue is None:
            raise Overloaded("not accepting requests")
        if self._queue.full():
            raise Overloaded(f"queue full ({self.queue_size} items)")
        loop = asyncio.get_running_loop()
        job = _Job(prepared=loop.run_in_executor(self._pool, self.prepare, item),
                   answer=loop.create_future())
        self._queue.put_nowait(job)  # cannot fail: checked full above, no await in between
        return job.answer

    # -- collector ----------------------------------------------------------------------------

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        jobs = [await self._queue.get()]
        # Wait for company only under load (the last batch was shared or left items queued):
        # an idle server answers a lone request at once instead of adding max_delay to it.
        delay = self.max_delay_s if self._under_load else 0.0
        deadline = time.perf_counter() + delay
        while len(jobs) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            jobs.append(job)
        return jobs

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            try:
                await self._run_batch(loop, jobs)
            except Exception as e:  # never let the collector die: fail this batch, go on
                log.exception("batcher: unexpected error")
                for job in jobs:
                    if not job.answer.done():
                        job.answer.set_exception(e)
            finally:
                self._under_load = len(jobs) > 1 or not self._queue.empty()
                for _ in jobs:
                    self._queue.task_done()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        await asyncio.wait([j.prepared for j in jobs])
        ready: list[tuple[_Job, Any]] = []
        for job in jobs:
            if job.answer.done():  # the submitter gave up (timeout, disconnect)
                continue
            exc = job.prepared.exception()
            if exc is not None:
                job.answer.set_exception(exc)
            else:
                ready.append((job, job.prepared.result()))
        if not ready:
            return
        t0 = time.perf_counter()
        answers = await loop.run_in_executor(self._infer_pool, self._handle_safely,
                                             [p for _, p in ready])
        if self.on_batch is not None:
            self.on_batch(BatchStats(size=len(ready), handle_s=time.perf_counter() - t0,
                                     queue_depth=self.depth))
        for (job, _), answer in zip(ready, answers, strict=True):
            if job.answer.done():
                continue
            if isinstance(answer, BaseException):
                job.answer.set_exception(answer)
            else:
                job.answer.set_result(answer)

    def _handle_safely(self, batch: list[Prep]) -> list[Out | BaseException]:
        """Runs in the inference thread. Whole-batch failure -> retry each item alone."""
        try:
            answers = list(self.handle(batch))
            if len(answers) != len(batch):
                raise RuntimeError(f"batch handler returned {len(answers)} answers for {len(batch)} items")
            return answers
        except Exception as e:
            if len(batch) == 1:
                return [e]
            log.warning("batcher: batch of %d failed (%s); retrying items one by one", len(batch), e)
            return [self._handle_safely([p])[0] for p in batch]
