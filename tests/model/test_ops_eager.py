"""model.ops.eager (the ops' computations without dispatch) gives exactly what model.ops gives."""

from __future__ import annotations

import pytest
import torch

from model import ops
from model.ops import eager


def _boxes(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (8 * n ** 0.5)  # dense enough to overlap at every n
    wh = 30 + torch.rand(n, 2, generator=g) * 20
    wh[: n // 10] = 0.004  # some below min_size
    return torch.cat([xy, xy + wh], 1).to(dtype)


@pytest.mark.parametrize("n,classes", [(0, 1), (1, 1), (40, 5), (1500, 30), (4000, 80), (2600, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_batched_nms_equals_the_op(n, classes, dtype):
    """Below and above the grouped threshold (2000 boxes), small and large groups, every dtype."""
    b = _boxes(n, n + classes, dtype)
    g = torch.Generator().manual_seed(n)
    s = torch.rand(n, generator=g).to(dtype)
    idx = torch.randint(1, classes + 1, (n,), generator=g)
    want = ops.batched_nms(b, s, idx, 0.5)
    got = eager.batched_nms(b, s, idx, 0.5)
    assert torch.equal(got, want)
    if n > 1:
        assert 0 < got.numel() < n  # the case suppresses something and keeps something


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_remove_small_boxes_equals_the_op(dtype):
    b = _boxes(300, 7).mul(3 if dtype == torch.int64 else 1).to(dtype)
    want = ops.remove_small_boxes(b, 1e-2 if dtype != torch.int64 else 1)
    got = eager.remove_small_boxes(b, 1e-2 if dtype != torch.int64 else 1)
    assert torch.equal(got, want) and 0 < got.numel() < 300
