"""Micro-batcher: many concurrent requests -> few batched backend calls, each over images of one size.

    submit(item, group, cost) --prepare(item) in the decode lanes (server/lanes.py)--> prepared
    prepared --key(prepared)--> the bucket of its key (the padded size: images batch together only
                                when their padding is identical, so a batch never changes an answer)
    dispatcher: a bucket is due when it holds max_batch_size items, or when its oldest item has
                waited max_delay (only under load, see _due); of the due buckets the one whose
                oldest item is oldest runs first (first come, first served across sizes: no size
                starves, and max_delay holds per image) -> handle(list) in an inference thread
                -> answers split back to each submitter's future

Direct path: when an image finishes decoding on an idle batcher (no image waiting or decoding
beside it, a free inference slot, not under load, wait_when_idle off), its decode thread runs it
as a batch of one itself, as the dispatcher would have at once, and hands only the answer back:
one thread hand-off instead of three (decode -> loop -> inference thread -> loop), about 0.2-0.4 ms
on these cores. Taken only in the small lane and with at least two small-lane threads, so another
image's decode still overlaps the backend call.

Contract of `handle` (as Ray Serve / Triton batch handlers): it takes a list of prepared items
and returns a list of the same length, each entry an answer or an Exception for that item only.
If `handle` raises for the whole batch, each item is retried alone so that one bad item fails
only itself. Items whose `prepare` failed never reach `handle`.

Cancellation: when a submitter's future is cancelled (its request got a 504, a 503, or the client
went away) the item leaves the batcher: its decode is dropped if it has not started, and it never
reaches `handle`. `cancel_group(group)` does that for every item of one request.

The number of accepted, not yet dispatched items is bounded: past queue_size `submit` raises
`Overloaded` (the server answers 503 with Retry-After). `stop()` refuses new items and drains
what was accepted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from server.lanes import DecodeLanes

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
    key: Hashable = None  # the bucket: the padded (H, W) for the server's engine


@dataclass(eq=False)
class _Job:
    answer: asyncio.Future  # what submit() returns
    group: Hashable
    prepared: Future | None = None  # prepare(item), run in the decode lanes
    value: Any = None  # its result, once bucketed
    key: Hashable = None
    bucketed: bool = False  # decoded, waiting in its bucket
    ready_at: float = 0.0
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[In, Prep, Out]):
    def __init__(self, *, prepare: Callable[[In], Prep],
                 handle: Callable[[list[Prep]], Sequence[Out | BaseException]],
                 key: Callable[[Prep], Hashable] | None = None,
                 max_batch_size: int = 8, max_delay_s: float = 0.01, queue_size: int = 64,
                 workers: int = 2, large_workers: int = 1, large_cost: int | None = None,
                 cost_budget: int | None = None, infer_threads: int = 1, wait_when_idle: bool = False,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_cancel: Callable[[str, int], None] | None = None) -> None:
        """key: bucket of a prepared item (None: one bucket for all). cost: what submit says an
        item will cost to prepare (decoded pixels); above large_cost it runs in the large lane;
        cost_budget bounds the cost being prepared at once. infer_threads: backend calls that may
        run at once (1: backends are not re-entrant and a batch should own the intra-op threads).
        on_cancel(stage, n): n items dropped before their "decode" or their "inference".
        wait_when_idle: wait max_delay for company even on an idle server (see _due)."""
        if max_batch_size < 1 or queue_size < 1 or workers < 1 or max_delay_s < 0 or infer_threads < 1:
            raise ValueError("max_batch_size, queue_size, workers, infer_threads >= 1 and max_delay_s >= 0 required")
        self.prepare = prepare
        self.handle = handle
        self.key = key or (lambda _: None)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.wait_when_idle = wait_when_idle
        self.on_batch = on_batch
        self.on_cancel = on_cancel
        big = 1 << 62
        self.lanes = DecodeLanes(workers=workers, large_workers=large_workers,
                                 large_cost=big if large_cost is None else large_cost,
                                 budget=big if cost_budget is None else cost_budget,
                                 on_cancel=lambda n: self._cancelled("decode", n))
        self._infer_pool = ThreadPoolExecutor(infer_threads, thread_name_prefix="infer")
        # Inference slots are taken by the dispatcher (event loop) and by the direct path (decode
        # threads), so their count is guarded; everything else stays the event loop's own.
        self._slots_lock = threading.Lock()
        self._free_slots = infer_threads
        self._direct = 0  # images in a direct backend call (still in _pending)
        self._direct_ok = workers >= 2 and not wait_when_idle
        self._pending: set[_Job] = set()  # accepted, not yet dispatched (preparing or bucketed)
        self._preparing = 0
        self._buckets: dict[Hashable, deque[_Job]] = {}
        self._running = 0  # batches in the inference threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._under_load = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new items, answer every accepted one, then stop the dispatcher and threads."""
        self._accepting = False
        if self._task is not None and self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("batcher: %d items not drained within %.1fs", self.depth, timeout_s)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            for job in list(self._pending):
                if not job.answer.done():
                    job.answer.set_exception(Overloaded("server shutting down"))
        await asyncio.to_thread(self.lanes.shutdown)
        self._infer_pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Items accepted and not yet in a backend call (being prepared or waiting for a batch)."""
        return len(self._pending) - self._direct

    def alone(self) -> bool:
        """From a decode thread: the image being prepared is the only one in the batcher (none
        other preparing, waiting or in a backend call). Reads loop-owned state unlocked, so it may
        be a moment stale: a hint for spending spare cores on this image, never for correctness."""
        return self._preparing == 1 and not self._buckets and not self._running and not self._direct

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, item: In, *, group: Hashable = None, cost: int = 0) -> Out:
        """Queue one item and wait for its answer (raises its per-item exception)."""
        return await self.submit_nowait(item, group=group, cost=cost)

    def submit_nowait(self, item: In, *, group: Hashable = None, cost: int = 0) -> asyncio.Future:
        """Queue one item; return the future of its answer. Raises Overloaded when full.
        group: items of one request (decoded round-robin with other groups, cancelled together)."""
        if not self._accepting or self._loop is None:
            raise Overloaded("not accepting requests")
        if self.depth >= self.queue_size:
            raise Overloaded(f"queue full ({self.queue_size} items)")
        job = _Job(answer=self._loop.create_future(), group=group if group is not None else object())
        self._pending.add(job)
        self._preparing += 1
        self._idle.clear()
        job.prepared = self.lanes.submit(job.group, cost, self.prepare, item)
        loop = self._loop
        direct = self._direct_ok and cost <= self.lanes.large_cost

        def prepared(_f: Future) -> None:
            # in the decode thread that finished; in the loop's own thread when the future was
            # cancelled, or done before this callback was added: never a backend call there
            if not (direct and threading.get_ident() != self._loop_thread and self._run_direct(job)):
                loop.call_soon_threadsafe(self._on_prepared, job)

        job.prepared.add_done_callback(prepared)
        job.answer.add_done_callback(lambda _f: self._on_answered(job))
        return job.answer

    def cancel_group(self, group: Hashable) -> None:
        """Cancel every unanswered item of `group`: queued decodes are dropped, nothing reaches handle."""
        self.lanes.cancel_group(group)
        for job in [j for j in self._pending if j.group == group]:
            job.answer.cancel()

    # -- bookkeeping (event loop thread) --------------------------------------------------------

    def _cancelled(self, stage: str, n: int) -> None:
        if self.on_cancel is not None and n:
            self.on_cancel(stage, n)

    def _on_prepared(self, job: _Job) -> None:
        self._preparing -= 1
        fut = job.prepared
        if job.answer.done() or fut.cancelled():
            if fut.cancelled() and not job.answer.done():  # the lanes shut down under it
                job.answer.set_exception(Overloaded("server shutting down"))
            elif not fut.cancelled():
                self._cancelled("inference", 1)  # decoded for nothing: dropped before the backend
            self._forget(job)
        elif fut.exception() is not None:
            job.answer.set_exception(fut.exception())
            self._forget(job)
        else:
            job.value = fut.result()
            try:
                job.key = self.key(job.value)
            except Exception as e:  # a key function bug fails this item, not the dispatcher
                job.answer.set_exception(e)
                self._forget(job)
                return
            job.ready_at, job.bucketed = time.perf_counter(), True
            self._buckets.setdefault(job.key, deque()).append(job)
        self._wake.set()

    def _on_answered(self, job: _Job) -> None:
        """Runs when the answer is set or cancelled; a cancelled item leaves the batcher now."""
        if not job.answer.cancelled() or job not in self._pending:
            return
        if job.bucketed:
            self._cancelled("inference", 1)
            q = self._buckets[job.key]
            q.remove(job)
            if not q:
                del self._buckets[job.key]
            self._forget(job)
        elif job.prepared is not None:
            # Not started: the lanes drop it (and count it), then _on_prepared forgets it.
            # Running: _on_prepared drops it when its decode ends.
            job.prepared.cancel()
        self._wake.set()

    def _forget(self, job: _Job) -> None:
        self._pending.discard(job)
        job.value = None
        if not self._pending and not self._running:
            self._idle.set()

    # -- dispatcher -----------------------------------------------------------------------------

    def _due(self, now: float) -> tuple[bool, Hashable, float | None]:
        """(whether a bucket is due, its key; else seconds until the next one is due, or None)."""
        # Wait for company only under load (the last batch was shared or left items pending) or
        # while images are still being decoded: an idle server answers a lone image at once
        # instead of adding max_delay to it.
        # wait_when_idle: always wait (more batching for bursts; lone requests pay max_delay).
        waiting = self.wait_when_idle or self._under_load or self._preparing
        wait = self.max_delay_s if waiting else 0.0
        best_key, best_age, next_in = None, None, None
        for key, q in self._buckets.items():
            head = q[0].ready_at
            due_at = now if len(q) >= self.max_batch_size else head + wait
            if due_at <= now:
                if best_age is None or head < best_age:
                    best_key, best_age = key, head
            elif next_in is None or due_at - now < next_in:
                next_in = due_at - now
        if best_age is not None:
            return True, best_key, None
        return False, None, next_in

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            timeout = None
            while self._free_slots and self._buckets:
                due, key, timeout = self._due(time.perf_counter())
                if not due:
                    break
                self._dispatch(key)
                timeout = None
            if not self._free_slots:
                timeout = None  # a finishing batch wakes us
            await self._woken(timeout)

    async def _woken(self, timeout: float | None) -> None:
        """Until _wake is set, or `timeout` seconds (the timer sets it: the loop above re-reads the
        buckets either way). Not asyncio.wait_for, which on Python < 3.12 runs the wait as one
        more task: two more event-loop turns between an image's decode and its dispatch."""
        timer = None if timeout is None else self._loop.call_later(timeout, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _dispatch(self, key: Hashable) -> None:
        q = self._buckets[key]
        jobs = [q.popleft() for _ in range(min(self.max_batch_size, len(q)))]
        if not q:
            del self._buckets[key]
        for job in jobs:
            job.bucketed = False
            self._pending.discard(job)
        self._under_load = len(jobs) > 1 or bool(self._pending)
        with self._slots_lock:
            self._free_slots -= 1
        self._running += 1
        items = [j.value for j in jobs]
        for j in jobs:
            j.value = None  # the batch holds the tensors now; cancelled jobs must not
        # The inference thread hands the answers straight back to the loop (_deliver): no task
        # and no asyncio-wrapped executor future between the backend and the submitters' futures.
        self._infer_pool.submit(self._infer, jobs, items, key)

    def _infer(self, jobs: list[_Job], items: list[Any], key: Hashable) -> None:
        """Inference thread: one backend call, then the answers to the event loop."""
        t0 = time.perf_counter()
        try:
            answers = self._handle_safely(items)
        except BaseException as e:  # noqa: BLE001 - never lose a batch: every item gets an answer
            log.exception("batcher: unexpected error")
            answers = [e] * len(jobs)
        self._loop.call_soon_threadsafe(self._deliver, jobs, answers, key, time.perf_counter() - t0)

    def _deliver(self, jobs: list[_Job], answers: list[Any], key: Hashable, handle_s: float) -> None:
        try:
            if self.on_batch is not None:
                self.on_batch(BatchStats(size=len(jobs), handle_s=handle_s, queue_depth=self.depth, key=key))
        except Exception:  # a metrics bug must not keep the answers from their requests
            log.exception("batcher: on_batch failed")
        for job, answer in zip(jobs, answers, strict=True):
            if job.answer.done():
                continue
            if isinstance(answer, BaseException):
                job.answer.set_exception(answer)
            else:
                job.answer.set_result(answer)
        self._batch_done()

    def _batch_done(self) -> None:
        with self._slots_lock:
            self._free_slots += 1
        self._running -= 1
        if not self._pending and not self._running:
            self._idle.set()
        if self._buckets:  # a freed slot matters to the dispatcher only with images waiting for it
            self._wake.set()

    # -- direct path (decode thread, see the module docstring) -----------------------------------

    def _run_direct(self, job: _Job) -> bool:
        """In the decode thread that prepared `job`: run it alone now if the batcher is idle (reads
        of loop-owned state may be a moment stale, which only decides whether a lone image waits for
        company it would not have had). False: the loop takes it as usual."""
        fut = job.prepared
        if fut.cancelled() or fut.exception() is not None or job.answer.done():
            return False
        with self._slots_lock:
            if not (self._accepting and self._free_slots and self._preparing == 1 and not self._buckets
                    and not self._under_load and not self._running):
                return False
            self._free_slots -= 1
            self._direct += 1
        t0 = time.perf_counter()
        key = None
        try:
            key = self.key(fut.result())
            answers = self._handle_safely([fut.result()])
        except BaseException as e:  # noqa: BLE001 - a key or handler bug fails this item only
            answers = [e]
        self._loop.call_soon_threadsafe(self._deliver_direct, job, answers, key, time.perf_counter() - t0)
        return True

    def _deliver_direct(self, job: _Job, answers: list[Any], key: Hashable, handle_s: float) -> None:
        self._preparing -= 1
        with self._slots_lock:
            self._direct -= 1
        self._pending.discard(job)
        self._running += 1  # _deliver's bookkeeping: the batch ends here
        self._deliver([job], answers, key, handle_s)

    def _handle_safely(self, batch: list[Prep]) -> list[Out | BaseException]:
        """Runs in an inference thread. Whole-batch failure -> retry each item alone."""
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
