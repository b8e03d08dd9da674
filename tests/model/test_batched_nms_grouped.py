"""batched_nms above the grouping size (per-group NMS) equals NMS run on each group alone."""

from __future__ import annotations

import pytest
import torch

from model.ops import batched_nms, nms
from model.ops.nms import _GROUPED_ABOVE, _PADDED_MAX


def test_grouped_path_equals_per_group_nms():
    g = torch.Generator().manual_seed(0)
    n = _GROUPED_ABOVE * 3
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 4], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 12, (n,), generator=g)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = torch.cat([torch.nonzero(idxs == c).flatten()[nms(boxes[idxs == c], scores[idxs == c], 0.5)]
                          for c in range(12)])
    assert sorted(keep.tolist()) == sorted(expected.tolist())
    assert keep.numel() < n  # something was suppressed
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])  # decreasing score, as torchvision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_small_groups_padded_together_equal_per_group_nms(dtype):
    """Above the grouping size, groups of at most _PADDED_MAX boxes run as one padded pass (the
    class-wise postprocess: many classes, few boxes each) beside larger groups run one by one; the
    result is each group's own NMS, score ties (2-digit scores) in index order."""
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, _PADDED_MAX + 1, (80,), generator=g)
    idxs = torch.cat([torch.repeat_interleave(torch.arange(80), sizes),
                      torch.full((1500,), 500), torch.full((_PADDED_MAX + 1,), 501)])  # two above the limit
    n = idxs.numel()
    assert n > _GROUPED_ABOVE
    idxs = idxs[torch.randperm(n, generator=g)]
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 2], 1).to(dtype)
    scores = torch.rand(n, generator=g).round(decimals=2)
    counts = torch.unique(idxs, return_counts=True)[1]
    assert (counts <= _PADDED_MAX).sum() == 80 and (counts > _PADDED_MAX).sum() == 2
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = torch.cat([torch.nonzero(idxs == c).flatten()[nms(boxes[idxs == c], scores[idxs == c], 0.5)]
                          for c in torch.unique(idxs).tolist()])
    expected = torch.sort(expected).values
    expected = expected[torch.sort(scores[expected], descending=True, stable=True).indices]
    assert torch.equal(keep, expected)
    assert keep.numel() < n
