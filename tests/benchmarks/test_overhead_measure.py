"""benchmarks.overhead.measure: who is timed when, what is counted (fake posts, no server)."""

from __future__ import annotations

from benchmarks.overhead import STAGES, measure


def _recording(calls: list[tuple[str, int]], label: str, inference: float):
    def post(i: int) -> dict:
        calls.append((label, i))
        return dict.fromkeys(STAGES, 0.0) | {"inference": inference}
    return post


def test_request_by_request_alternates_and_drops_ten_warmups():
    calls: list[tuple[str, int]] = []
    res = measure({"a": _recording(calls, "a", 1.0), "b": _recording(calls, "b", 2.0)}, 5)
    assert len(calls) == 2 * 15  # 10 warm-up requests each, then 5 counted
    assert [c[0] for c in calls[:4]] == ["b", "a", "a", "b"]  # the order flips every turn
    assert res["a"]["p50"]["inference"] == 1.0 and res["b"]["p50"]["inference"] == 2.0


def test_blocks_take_turns_and_skip_each_block_s_first_two():
    calls: list[tuple[str, int]] = []
    res = measure({"a": _recording(calls, "a", 1.0), "b": _recording(calls, "b", 2.0)}, 8, block=4)
    labels = [c[0] for c in calls]
    # turns of 4 + 2 requests; the first turn of each label is warm-up
    assert labels[:6] == ["b"] * 6 and labels[6:12] == ["a"] * 6 and labels[12:18] == ["a"] * 6
    assert all(len(set(labels[k:k + 6])) == 1 for k in range(0, len(labels), 6))
    assert [i for label, i in calls if label == "a"] == list(range(len(labels) // 2))
    assert len(calls) == 2 * 6 * 3  # one warm-up turn and two counted turns of 4 each
    assert set(res) == {"a", "b", "loadavg"} and res["b"]["p10"]["inference"] == 2.0
