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


# -- buckets: images batch only with images of the same key (the padded size) ----------------------

def test_items_batch_only_with_items_of_their_key():
    stats: list[BatchStats] = []
    seen: list[list[int]] = []

    def handle(items):
        seen.append(list(items))
        return items

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, key=lambda x: x % 2, max_batch_size=4,
                         max_delay_s=60.0, on_batch=stats.append)
        await b.start()
        out = await asyncio.gather(*[b.submit_nowait(i) for i in range(8)])  # 4 even, 4 odd: two full buckets
        await b.stop()
        return out

    assert _run(main()) == list(range(8))
    assert sorted(map(sorted, seen)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert sorted((s.key, s.size) for s in stats) == [(0, 4), (1, 4)]


def test_oldest_due_bucket_runs_first_not_the_fullest():
    """Fair across sizes: a full bucket does not overtake an older item of another size."""
    order: list[list[str]] = []
    gate = threading.Event()

    def handle(items):
        if items == ["x0"]:
            gate.wait(5)  # hold the backend while the others queue up
        order.append(list(items))
        return items

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, key=lambda x: x[0], max_batch_size=4, max_delay_s=0.0)
        await b.start()
        first = b.submit_nowait("x0")
        while b.depth:  # x0 is in the (held) backend
            await asyncio.sleep(0)
        rest = [b.submit_nowait(s) for s in ("a1", "b1", "b2", "b3", "b4")]
        while b.lanes.running("small") or b._preparing:  # all five decoded and bucketed
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *rest)
        await b.stop()

    _run(main())
    assert order == [["x0"], ["a1"], ["b1", "b2", "b3", "b4"]]


def test_cancel_group_drops_unstarted_decodes_and_keeps_decoded_items_from_the_backend():
    started: list[int] = []
    release = threading.Event()
    handled: list[int] = []
    cancelled: list[tuple[str, int]] = []

    def prepare(x: int) -> int:
        started.append(x)
        if x == 0:
            release.wait(5)  # the first decode is running when the request goes away
        return x

    def handle(items):
        handled.extend(items)
        return items

    async def main():
        b = MicroBatcher(prepare=prepare, handle=handle, max_batch_size=8, max_delay_s=0.0, workers=1,
                         on_cancel=lambda stage, n: cancelled.append((stage, n)))
        await b.start()
        group = object()
        futs = [b.submit_nowait(i, group=group) for i in range(4)]
        while not started:
            await asyncio.sleep(0)
        b.cancel_group(group)
        release.set()
        other = await b.submit(99)  # the batcher goes on serving others
        await b.stop()
        return futs, other

    futs, other = _run(main())
    assert other == 99 and all(f.cancelled() for f in futs)
    assert started == [0, 99]  # items 1-3 never decoded
    assert handled == [99]  # item 0, decoded after its request left, never reached the backend
    assert sorted(cancelled) == [("decode", 3), ("inference", 1)]


# -- decode lanes ----------------------------------------------------------------------------------

def test_lanes_take_turns_between_groups_and_keep_large_images_apart():
    from server.lanes import DecodeLanes

    order: list[str] = []
    hold = threading.Event()

    def work(name: str) -> str:
        if name == "a1":
            hold.wait(5)
        order.append(name)
        return name

    lanes = DecodeLanes(workers=1, large_workers=1, large_cost=100, budget=10_000)
    try:
        futs = [lanes.submit("A", 1, work, n) for n in ("a1", "a2", "a3")]
        while not lanes.running("small"):  # a1 holds the one small-lane thread
            pass
        futs.append(lanes.submit("B", 1, work, "b1"))
        big = lanes.submit("C", 1000, work, "big")  # its own lane: runs although the small lane is held
        assert big.result(5) == "big"
        hold.set()
        assert [f.result(5) for f in futs] == ["a1", "a2", "a3", "b1"]
    finally:
        hold.set()
        lanes.shutdown()
    # B's one image waits for one more of A's, not for all of them
    assert order == ["big", "a1", "a2", "b1", "a3"]


def test_lanes_pixel_budget_bounds_what_runs_at_once():
    from server.lanes import DecodeLanes

    running, peak = [0], [0]
    lock = threading.Lock()

    def work(meet):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if meet is not None:
            meet.wait()  # BrokenBarrierError unless `meet.parties` tasks run at once
        else:
            threading.Event().wait(0.02)  # a decode's duration: time for a wrong second start
        with lock:
            running[0] -= 1

    lanes = DecodeLanes(workers=4, large_workers=1, large_cost=10**9, budget=10)
    try:
        for f in [lanes.submit(i, 6, work, None) for i in range(4)]:  # 6 + 6 > 10: one at a time
            f.result(5)
        assert peak[0] == 1
        peak[0] = 0
        meet = threading.Barrier(3, timeout=5)
        for f in [lanes.submit(i, 3, work, meet) for i in range(6)]:  # three fit (9 <= 10), a fourth does not
            f.result(10)
        assert peak[0] == 3
    finally:
        lanes.shutdown()


def test_different_keys_run_at_once_with_two_inference_threads():
    meet = threading.Barrier(2, timeout=5)  # BrokenBarrierError unless both batches run together

    def handle(items):
        meet.wait()
        return items

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, key=lambda x: x % 2, max_batch_size=2,
                         max_delay_s=60.0, infer_threads=2)
        await b.start()
        out = await asyncio.gather(*[b.submit_nowait(i) for i in range(4)])
        await b.stop()
        return out

    assert _run(main()) == [0, 1, 2, 3]


def test_a_lone_size_waits_max_delay_not_for_company_that_never_comes():
    """max_delay holds per image: under load, a size with one image still runs once it has waited."""
    stats: list[BatchStats] = []

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=lambda items: items, key=lambda x: x[0], max_batch_size=4,
                         max_delay_s=0.05, wait_when_idle=True, on_batch=stats.append)
        await b.start()
        out = await asyncio.wait_for(asyncio.gather(*[b.submit_nowait(s) for s in ("a1", "b1", "b2")]), 10)
        await b.stop()
        return out

    assert _run(main()) == ["a1", "b1", "b2"]
    assert sorted((s.key, s.size) for s in stats) == [("a", 1), ("b", 2)]


def test_lone_image_on_an_idle_batcher_runs_in_its_decode_thread():
    """The direct path: nothing else in flight, so the decode thread runs the batch of one itself
    (one hand-off back to the loop); stats, depth and the slot count stay as for a dispatched batch."""
    threads: list[str] = []
    stats: list[BatchStats] = []

    def handle(items):
        threads.append(threading.current_thread().name)
        return _square_all(items)

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=4, max_delay_s=0.5,
                         workers=2, on_batch=stats.append)
        await b.start()
        out = [await b.submit_nowait(i) for i in (3, 4)]  # one after another: each alone
        bad = await asyncio.gather(b.submit_nowait(-1), return_exceptions=True)
        depth, slots = b.depth, b._free_slots
        await b.stop()
        return out, bad, depth, slots

    out, bad, depth, slots = _run(main())
    assert out == [9, 16] and isinstance(bad[0], ValueError)
    assert len(threads) == 3 and all(t.startswith("decode-small") for t in threads)
    assert [s.size for s in stats] == [1, 1, 1] and depth == 0 and slots == 1


def test_direct_path_is_not_taken_with_one_decode_thread_or_under_load():
    """With one decode thread the backend call would block the next image's decode; with company
    in flight the dispatcher batches as before."""
    threads: list[str] = []
    gate = threading.Event()

    def handle(items):
        threads.append(threading.current_thread().name)
        gate.wait(5)
        return _square_all(items)

    async def main(workers: int, n: int):
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=4, max_delay_s=0.05,
                         workers=workers)
        await b.start()
        futs = [b.submit_nowait(i) for i in range(n)]
        gate.set()
        out = await asyncio.gather(*futs)
        await b.stop()
        return out

    assert _run(main(1, 1)) == [0]
    assert threads == ["infer_0"]
    threads.clear()
    gate.clear()
    assert _run(main(2, 6)) == [i * i for i in range(6)]
    assert "infer_0" in threads  # the items decoded beside others went through the dispatcher


def test_direct_path_never_runs_the_backend_on_the_event_loop():
    """A decode that finishes before its callback is attached calls the callback in the loop's own
    thread: that image must go through the dispatcher, not run its backend call there."""
    import concurrent.futures

    threads: list[str] = []

    def handle(items):
        threads.append(threading.current_thread().name)
        return _square_all(items)

    async def main():
        b = MicroBatcher(prepare=lambda x: x, handle=handle, max_batch_size=4, max_delay_s=0.05, workers=2)
        await b.start()

        def submit_done(group, cost, fn, arg):  # the lanes, as if the decode were already done
            f = concurrent.futures.Future()
            f.set_result(fn(arg))
            return f

        b.lanes.submit = submit_done
        out = await b.submit_nowait(5)
        await b.stop()
        return out

    assert _run(main()) == 25
    assert threads == ["infer_0"]


def test_alone_is_true_only_for_a_lone_image_with_nothing_else_in_flight():
    """What the server asks before decoding an image in two bands (both cores): only when no other
    image is preparing, waiting for a batch or in a backend call."""
    seen: dict[int, bool] = {}
    gate, running = threading.Event(), threading.Event()
    together = threading.Barrier(2, timeout=5)
    b: MicroBatcher

    def prepare(x):
        if x in (2, 3):
            together.wait()  # both in their decode threads at once
        seen[x] = b.alone()
        return x

    def handle(items):
        running.set()
        gate.wait(5)
        return _square_all(items)

    async def main():
        nonlocal b
        b = MicroBatcher(prepare=prepare, handle=handle, max_batch_size=4, max_delay_s=0.01, workers=2)
        await b.start()
        gate.set()
        assert await b.submit_nowait(1) == 1  # alone
        assert await asyncio.gather(b.submit_nowait(2), b.submit_nowait(3)) == [4, 9]  # decoded together
        gate.clear()
        running.clear()
        first = b.submit_nowait(4)
        await asyncio.to_thread(running.wait, 5)  # 4 is in its backend call
        second = b.submit_nowait(5)
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(first, second) == [16, 25]
        await b.stop()

    _run(main())
    assert seen[1] is True and seen[4] is True
    assert seen[2] is False and seen[3] is False  # each with the other
    assert seen[5] is False  # another image in the backend
