"""batched_nms above the grouping size (per-group NMS) equals NMS run on each group alone."""

from __future__ import annotations

import torch

from model.ops import batched_nms, nms
from model.ops.nms import _GROUPED_ABOVE


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
