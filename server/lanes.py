"""Decode lanes: worker threads that share out decode work fairly and within a pixel budget.

    DecodeLanes.submit(group, cost, fn, arg) -> concurrent.futures.Future
        cost <= large_cost  -> the "small" lane (`workers` threads)
        cost >  large_cost  -> the "large" lane (`large_workers` threads)

Why two lanes: decoding a 40-megapixel PNG takes about a second of one core. With one shared
first-come pool, a client that sends sixteen of them (a few KB each) holds every decode thread for
many seconds and every other client waits behind it. Large decodes get their own threads, so small
images always have a free decoder.

Within a lane, work is taken round-robin over groups (a group = one HTTP request): a request with
sixteen images does not hold a lane until its sixteenth is done while another request's one image
waits.

The budget bounds the decoded pixels in flight across both lanes (memory: 3 bytes a pixel decoded,
more while it is normalized): a task starts only when its cost fits beside the running ones, or when
nothing runs (one image over the budget would otherwise never start; the per-image limit,
max_pixels, bounds that case).

Cancellation: `cancel_group(group)` drops the group's tasks that have not started (their futures
are cancelled); a future cancelled by its owner is dropped the same way when a thread reaches it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Task:
    future: Future
    cost: int
    fn: Callable[[Any], Any]
    arg: Any


@dataclass
class _Lane:
    name: str
    ready: threading.Condition  # this lane's threads wait here (one lock shared by both lanes)
    groups: OrderedDict[Hashable, deque[_Task]] = field(default_factory=OrderedDict)
    running: int = 0


class DecodeLanes:
    def __init__(self, *, workers: int, large_workers: int = 1, large_cost: int, budget: int,
                 on_cancel: Callable[[int], None] | None = None) -> None:
        if workers < 1 or large_workers < 1 or budget < 1:
            raise ValueError("workers, large_workers and budget must be >= 1")
        self.large_cost, self.budget = large_cost, budget
        self.on_cancel = on_cancel  # called with the number of tasks dropped before they started
        # One lock, a condition per lane: a submit wakes one thread of its own lane (waking every
        # thread of both lanes cost the event loop about 0.15 ms a request, and woke threads that
        # had nothing to take); a finished task frees budget and wakes the lanes that have tasks queued.
        self._lock = threading.Lock()
        self._small = _Lane("small", threading.Condition(self._lock))
        self._large = _Lane("large", threading.Condition(self._lock))
        self._in_flight = 0  # cost of the running tasks
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(lane,), name=f"decode-{lane.name}-{i}", daemon=True)
                         for lane, n in ((self._small, workers), (self._large, large_workers)) for i in range(n)]
        for t in self._threads:
            t.start()

    # -- owner side ---------------------------------------------------------------------------

    def submit(self, group: Hashable, cost: int, fn: Callable[[Any], Any], arg: Any) -> Future:
        fut: Future = Future()
        lane = self._large if cost > self.large_cost else self._small
        with self._lock:
            if self._closed:
                raise RuntimeError("decode lanes are shut down")
            lane.groups.setdefault(group, deque()).append(_Task(fut, cost, fn, arg))
            lane.ready.notify()
        return fut

    def cancel_group(self, group: Hashable) -> int:
        """Drop the group's not-yet-started tasks; returns how many."""
        dropped: list[_Task] = []
        with self._lock:
            for lane in (self._small, self._large):
                dropped += lane.groups.pop(group, ())
        for task in dropped:
            task.future.cancel()
        if dropped and self.on_cancel is not None:
            self.on_cancel(len(dropped))
        return len(dropped)

    @property
    def in_flight(self) -> int:
        """Decoded-pixel cost of the tasks running now."""
        return self._in_flight

    def running(self, lane: str) -> int:
        return (self._large if lane == "large" else self._small).running

    def shutdown(self) -> None:
        """Refuse new tasks, cancel queued ones, wait for the running ones."""
        with self._lock:
            self._closed = True
            queued = [t for lane in (self._small, self._large) for g in lane.groups.values() for t in g]
            for lane in (self._small, self._large):
                lane.groups.clear()
                lane.ready.notify_all()
        for t in queued:
            t.future.cancel()
        for t in self._threads:
            t.join()

    # -- worker side --------------------------------------------------------------------------

    def _next(self, lane: _Lane) -> _Task | None:
        """Under the lock: the next task of this lane that may start now, round-robin over groups."""
        while lane.groups:
            group, tasks = next(iter(lane.groups.items()))
            task = tasks[0]
            if task.future.cancelled():  # its owner gave up before we reached it
                tasks.popleft()
                if not tasks:
                    del lane.groups[group]
                if self.on_cancel is not None:
                    self.on_cancel(1)
                continue
            if self._in_flight and self._in_flight + task.cost > self.budget:
                return None  # wait for running work to release pixels
            tasks.popleft()
            del lane.groups[group]
            if tasks:  # the group goes to the back of the line
                lane.groups[group] = tasks
            return task
        return None

    def _work(self, lane: _Lane) -> None:
        while True:
            with self._lock:
                task = None
                while not self._closed and (task := self._next(lane)) is None:
                    lane.ready.wait()
                if task is None:
                    return
                if not task.future.set_running_or_notify_cancel():
                    continue
                self._in_flight += task.cost
                lane.running += 1
            error: BaseException | None = None
            try:
                result = task.fn(task.arg)
            except BaseException as e:  # noqa: BLE001 - handed to the owner, like an executor
                error = e
            with self._lock:
                self._in_flight -= task.cost
                lane.running -= 1
                # pixels freed: a queued task of either lane may fit now
                for other in (self._small, self._large):
                    if other.groups:
                        other.ready.notify_all()
            # The future's callbacks run here, in this thread, after the budget is released: the
            # batcher may run the image's backend call from one (its direct path)
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)
