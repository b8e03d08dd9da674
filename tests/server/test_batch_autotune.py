"""batch_autotune: the server batches only up to the largest size whose backend call pays (>= 10% less
time per image than the size before it), so a batch never costs throughput (R50-FPN on this CPU:
1.34 s per image alone, 1.40 s in a batch of 4)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from srv_helpers import serve

from server.engine import Engine


class _TimedPipe:
    """A pipeline whose backend call sleeps `cost(batch size)` seconds: what batching does to a
    compute-bound CPU model (time grows with the batch) or to a GPU (about one call's time)."""

    class_names = ["__background__", "a"]

    def __init__(self, cost):
        self.cost, self.calls = cost, []

    def prepare(self, image):
        return image

    def collate(self, items):
        return SimpleNamespace(n=len(items))

    def infer(self, batch):
        self.calls.append(batch.n)
        time.sleep(self.cost(batch.n))
        return batch

    def postprocess(self, raw, batch, options):
        empty = np.zeros((0, 4), np.float32)
        return [SimpleNamespace(boxes=empty, scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int64))
                for _ in range(batch.n)]


@pytest.mark.parametrize(("cost", "want"), [
    (lambda b: 0.1 * b, 1),  # linear in the batch (CPU, compute bound): no size pays
    (lambda b: 0.1 * b ** 1.2, 1),  # worse than linear (caches): batching would lose
    (lambda b: 0.1, 8),  # one call's time whatever the batch (GPU): the largest size
    (lambda b: 0.1 if b <= 2 else 0.1 * b, 2),  # pays up to 2, not beyond
])
def test_tuned_size_is_the_largest_that_pays(cost, want):
    pipe = _TimedPipe(cost)
    size, per_image = Engine(pipe, max_pixels=10**8).tune_batch_size(8, size=(8, 8))
    assert size == want, per_image
    assert set(per_image) <= {1, 2, 4, 8} and 1 in per_image


def test_tuning_stops_at_the_first_size_that_does_not_pay():
    pipe = _TimedPipe(lambda b: 0.1 * b)
    Engine(pipe, max_pixels=10**8).tune_batch_size(64, size=(8, 8))
    assert max(pipe.calls) == 2  # batch 2 did not pay: 4 ... 64 never ran


def test_server_batches_up_to_the_tuned_size(make_settings):
    """The real app with the tiny model: the size it chose is what /model and /metrics report, and
    the batches it forms never exceed it."""
    with serve(make_settings(batch_autotune=True, max_batch_size=4)) as (url, _):
        info = httpx.get(f"{url}/model").json()
        metrics = httpx.get(f"{url}/metrics").text
    chosen = float(next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("frcnn_max_batch_size ")))
    assert info["max_batch_size"] == chosen and 1 <= chosen <= 4
