"""The in-graph postprocess of --with-nms graphs, exported alone, against model.postprocess: images
without RoIs, images whose RoIs all fall below the score threshold, more detections than K."""

from __future__ import annotations

import pytest
import torch

from export.lowering import translation_table
from export.wrappers import padded_postprocess
from model.postprocess import RawDetections, postprocess

ort = pytest.importorskip("onnxruntime")
K = 5


class _Post(torch.nn.Module):
    def forward(self, images, batch_idx, scores, boxes):
        return padded_postprocess(batch_idx, scores, boxes, images.shape[0], score_thresh=0.3, nms_thresh=0.5,
                                  min_size=1.0, max_detections=K)


def _raw(g: torch.Generator) -> RawDetections:
    """Image 0: 12 RoIs with high scores; image 1: no RoIs; image 2: 4 RoIs all below 0.3; image 3: 6."""
    batch_idx = torch.tensor([0] * 12 + [2] * 4 + [3] * 6)
    r, c = batch_idx.numel(), 4
    scores = torch.rand(r, c, generator=g)
    scores[12:16] *= 0.29
    xy = torch.rand(r, c, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(r, c, 2, generator=g) * 30], -1)
    boxes[0, 1] = torch.tensor([3.0, 3.0, 3.5, 40.0])  # thinner than min_size: removed
    return RawDetections(batch_idx, scores, boxes)


def test_padded_postprocess_matches_postprocess_in_onnxruntime():
    g = torch.Generator().manual_seed(0)
    raw = _raw(g)
    images = torch.zeros(4, 3, 8, 8)
    Dim = torch.export.Dim
    r = Dim("R")
    ep = torch.export.export(_Post(), (images, *raw), strict=False,
                             dynamic_shapes=({0: Dim("B")}, {0: r}, {0: r}, {0: r}))
    prog = torch.onnx.export(ep, dynamo=True, custom_translation_table=translation_table(), verbose=False)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString())
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (images, *raw), strict=True)}
    boxes, scores, labels, num = (torch.from_numpy(a) for a in sess.run(None, feeds))
    sizes = torch.tensor([[100, 100]] * 4)
    want = postprocess(raw, sizes, sizes, score_thresh=0.3, nms_thresh=0.5, detections_per_img=K, min_size=1.0)
    assert num.tolist() == [len(d.scores) for d in want]
    assert num[0] == K and num[1] == 0 and num[2] == 0 and 0 < num[3] <= K
    for i, det in enumerate(want):
        n = len(det.scores)
        torch.testing.assert_close(scores[i, :n], det.scores)
        torch.testing.assert_close(boxes[i, :n], det.boxes)
        assert torch.equal(labels[i, :n], det.labels)
        assert not scores[i, n:].any() and not boxes[i, n:].any() and not labels[i, n:].any()
    # and a batch with no RoIs at all
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), torch.zeros(0, 4, 4))
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (images[:2], *empty), strict=True)}
    boxes, scores, labels, num = sess.run(None, feeds)
    assert boxes.shape == (2, K, 4) and num.tolist() == [0, 0] and not scores.any()
