"""MicroBatcher with small real callables: batching, per-item errors, backpressure, draining."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.batcher import BatchStats, MicroBatcher, Overloaded


def _square_all(items: list[int]) -> list[int | BaseException]:
    return [ValueError(f"bad {x}") if x < 0 else x * x for x in items]


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_items_form_batches_and_answers_are_routed_back():
    stats: list[BatchStats] = []
    gate = threading.Event()

    def handle(items):
        gate.wait(5)  # hold the first batch so that the rest queue up behind it
        return _square_all(items)

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=4, max_delay_s=0.5,
                         queue_size=64, workers=2, on_batch=stats.append)
        await b.start()
        futs = [b.submit_nowait(i) for i in range(9)]
        # the first batch cuts at 4 items without waiting out the delay; release it
        gate.set()
        out = await asyncio.gather(*futs)
        await b.stop()
        return out

    assert _run(main()) == [i * i for i in range(9)]
    assert [s.size for s in stats] == [4, 4, 1]


def test_error_in_one_item_fails_only_that_item():
    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=_square_all, max_batch_size=8, max_delay_s=0.05)
        await b.start()
        futs = [b.submit_nowait(x) for x in (2, -1, 3)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        await b.stop()
        return out

    a, bad, c = _run(main())
    assert (a, c) == (4, 9)
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"


def test_prepare_error_never_reaches_handler():
    seen: list[list[int]] = []

    def prepare(x: int) -> int:
        if x == 13:
            raise KeyError("unlucky")
        return x + 1

    def handle(items):
        seen.append(list(items))
        return items

    async def main():
        b = MicroBatcher(prepare=prepare, handle=handle, max_batch_size=8, max_delay_s=0.05)
        await b.start()
        out = await asyncio.gather(*[b.submit_nowait(x) for x in (1, 13, 2)], return_exceptions=True)
        await b.stop()
        return out

    one, bad, two = _run(main())
    assert (one, two) == (2, 3) and isinstance(bad, KeyError)
    assert sorted(x for batch in seen for x in batch) == [2, 3]


def test_whole_batch_failure_is_retried_item_by_item():
    calls: list[list[int]] = []

    def handle(items):
        calls.append(list(items))
        if 0 in items:  # a poisonous item breaks the whole batched call
            raise ZeroDivisionError("boom")
        return [10 // x for x in items]

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=8, max_delay_s=0.05)
        await b.start()
        out = await asyncio.gather(*[b.submit_nowait(x) for x in (5, 0, 2)], return_exceptions=True)
        await b.stop()
        return out

    five, zero, two = _run(main())
    assert (five, two) == (2, 5) and isinstance(zero, ZeroDivisionError)
    assert calls[0] == [5, 0, 2] and sorted(map(tuple, calls[1:])) == [(0,), (2,), (5,)]


def test_full_queue_raises_overloaded():
    gate = threading.Event()

    def handle(items):
        gate.wait(5)
        return items

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=1, max_delay_s=0,
                         queue_size=2)
        await b.start()
        first = b.submit_nowait(0)
        while b.depth:  # wait until the collector took item 0 into the (blocked) handler
            await asyncio.sleep(0)
        queued = [b.submit_nowait(1), b.submit_nowait(2)]
        with pytest.raises(Overloaded):
            b.submit_nowait(3)
        gate.set()
        out = await asyncio.gather(first, *queued)
        await b.stop()
        return out

    assert _run(main()) == [0, 1, 2]


def test_stop_drains_accepted_items_and_refuses_new_ones():
    gate = threading.Event()

    def handle(items):
        gate.wait(5)
        return [x + 100 for x in items]

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=2, max_delay_s=0,
                         queue_size=16)
        await b.start()
        futs = [b.submit_nowait(i) for i in range(5)]
        stopping = asyncio.create_task(b.stop(timeout_s=10))
        await asyncio.sleep(0)  # let stop() flip the accepting flag
        with pytest.raises(Overloaded):
            b.submit_nowait(99)
        gate.set()
        await stopping
        return [f.result() for f in futs]

    assert _run(main()) == [100, 101, 102, 103, 104]


def test_abandoned_items_are_skipped():
    handled: list[int] = []
    gate = threading.Event()

    def handle(items):
        gate.wait(5)
        handled.extend(items)
        return items

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=1, max_delay_s=0)
        await b.start()
        first = b.submit_nowait(1)
        while b.depth:
            await asyncio.sleep(0)
        gone = b.submit_nowait(2)
        gone.cancel()  # the client timed out while item 2 waited
        last = b.submit_nowait(3)
        gate.set()
        out = await asyncio.gather(first, last)
        await b.stop()
        return out

    assert _run(main()) == [1, 3]
    assert handled == [1, 3]


def test_idle_batcher_does_not_wait_out_the_delay():
    """A lone request on an idle server is answered at once; max_delay applies only under load."""
    stats: list[BatchStats] = []

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=_square_all, max_batch_size=8, max_delay_s=30.0,
                         on_batch=stats.append)
        await b.start()
        first = await asyncio.wait_for(b.submit(3), 10)  # would take 30 s if the delay applied
        await b.stop()
        return first

    assert _run(main()) == 9 and [s.size for s in stats] == [1]
