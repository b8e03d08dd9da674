"""Target assignment, sampling and losses of model/ (matching.py, rpn.py, roi_heads.py) on
hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from model.anchors import AnchorGenerator
from model.config import RoIHeadsConfig, RPNConfig
from model.matching import BELOW, BETWEEN, assign, match, sample, smooth_l1
from model.roi_heads import FastRCNNPredictor, RoIHeads
from model.rpn import RPN, RPNHead


def test_match_thresholds():
    iou = torch.tensor([[0.8, 0.4, 0.1, 0.65, 0.0],
                        [0.2, 0.75, 0.05, 0.3, 0.0]])
    m = match(iou, fg_thresh=0.7, bg_thresh=0.3)
    assert m.tolist() == [0, 1, BELOW, BETWEEN, BELOW]
    # Fast R-CNN's [0.1, 0.5) background: below 0.1 is ignored
    m = match(iou, fg_thresh=0.5, bg_thresh=0.5, bg_lo=0.1)
    assert m.tolist() == [0, 1, BELOW, 0, BETWEEN]  # 0.1 is in [0.1, 0.5)


def test_match_low_quality_gives_each_gt_its_best_anchors_with_ties():
    iou = torch.tensor([[0.5, 0.2, 0.5],
                        [0.1, 0.6, 0.0]])
    assert match(iou, fg_thresh=0.7, bg_thresh=0.3).tolist() == [BETWEEN, BETWEEN, BETWEEN]
    assert match(iou, fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True).tolist() == [0, 1, 0]


def test_match_low_quality_keeps_the_anchors_own_best_gt():
    # gt 1's best anchor (1) overlaps gt 0 more: it stays matched to gt 0 (torchvision's rule)
    iou = torch.tensor([[0.6, 0.55],
                        [0.1, 0.5]])
    assert match(iou, fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True).tolist() == [0, 0]


def test_match_without_gt_is_all_background():
    assert match(torch.zeros(0, 3), fg_thresh=0.7, bg_thresh=0.3).tolist() == [BELOW] * 3


@pytest.mark.parametrize("n_pos,n_neg,batch,frac,exp_pos,exp_neg", [
    (10, 300, 256, 0.5, 10, 246),    # few positives: negatives fill the batch
    (200, 300, 256, 0.5, 128, 128),  # RPN: at most half positive
    (0, 300, 256, 0.5, 0, 256),
    (300, 1000, 512, 0.25, 128, 384),  # RoI head: 25% positive
    (5, 7, 512, 0.25, 5, 7),         # not enough of either: everything
])
def test_sampling_ratios(n_pos, n_neg, batch, frac, exp_pos, exp_neg):
    labels = torch.cat([torch.full((n_pos,), 3), torch.zeros(n_neg, dtype=torch.int64), torch.full((50,), -1)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    pos, neg = sample(labels, batch_size=batch, positive_fraction=frac, generator=torch.Generator().manual_seed(1))
    assert (pos.numel(), neg.numel()) == (exp_pos, exp_neg)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist()) | set(neg.tolist())) == exp_pos + exp_neg  # no duplicates


def test_assign_labels_and_matched_boxes():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    preds = torch.tensor([[0.0, 0.0, 10.0, 10.0], [21.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 20.0], [50.0, 50, 60, 60]])
    labels, matched, iou = assign(preds, gt, torch.tensor([4, 7]), fg_thresh=0.7, bg_thresh=0.3)
    assert labels.tolist() == [4, 7, -1, 0]  # IoU 1, 0.9, 0.5 (ignored), 0
    assert matched[1].tolist() == [20.0, 20.0, 30.0, 30.0]
    assert iou.tolist() == pytest.approx([1.0, 0.9, 0.5, 0.0])
    labels, _, _ = assign(preds, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), fg_thresh=0.7, bg_thresh=0.3)
    assert labels.tolist() == [0, 0, 0, 0]  # an image without boxes: all negatives


def test_smooth_l1_values():
    beta = 1 / 9
    x = torch.tensor([0.05, -1.0, 0.0])
    # 0.5 x^2 / beta inside, |x| - beta / 2 outside
    expected = 0.5 * 0.05**2 / beta + (1.0 - beta / 2)
    assert float(smooth_l1(x, torch.zeros(3), beta)) == pytest.approx(expected)
    assert float(smooth_l1(x, torch.zeros(3), 0.0)) == pytest.approx(1.05)  # beta 0: plain L1


def _rpn(**cfg):
    head = RPNHead(in_channels=4, num_anchors=1)
    for p in head.parameters():
        nn.init.zeros_(p)  # objectness logit 0 (p = 0.5), deltas 0
    gen = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))
    return RPN(head=head, anchor_generator=gen, cfg=RPNConfig(**cfg))


def _rpn_losses(rpn, gt):
    # one 2x2 level of stride 8 on a 16x16 image: anchors [-4,-4,4,4], [4,-4,12,4], [-4,4,4,12], [4,4,12,12]
    feats = [torch.zeros(1, 4, 2, 2)]
    targets = [{"boxes": torch.tensor([gt]), "labels": torch.tensor([1])}]
    losses = rpn.losses(feats, torch.tensor([[16, 16]]), (16, 16), targets)
    return float(losses["loss_objectness"].detach()), float(losses["loss_rpn_box_reg"].detach())


def test_rpn_losses_hand_computed():
    # gt [5,4,13,12] vs anchor [4,4,12,12]: IoU 56/72 = 0.78 -> positive; the others IoU 0 -> negative
    # box target (dx, dy, dw, dh) = (1/8, 0, 0, 0): smooth-L1 0.125 - 1/18, averaged over 4 sampled
    obj, box = _rpn_losses(_rpn(), [5.0, 4.0, 13.0, 12.0])
    assert obj == pytest.approx(math.log(2))
    assert box == pytest.approx((0.125 - 1 / 18) / 4)


def test_rpn_cross_boundary_anchors_ignored():
    # only anchor [4,4,12,12] lies inside the image: 1 sampled anchor
    obj, box = _rpn_losses(_rpn(ignore_cross_boundary=True), [5.0, 4.0, 13.0, 12.0])
    assert obj == pytest.approx(math.log(2))
    assert box == pytest.approx(0.125 - 1 / 18)


def test_rpn_low_quality_match_makes_a_positive():
    # gt [0,0,6,6]: best anchor [-4,-4,4,4] has IoU 16/84 < 0.3 but is made positive;
    # target (dx, dy, dw, dh) = (3/8, 3/8, log(6/8), log(6/8))
    _, box = _rpn_losses(_rpn(), [0.0, 0.0, 6.0, 6.0])
    t = [3 / 8, 3 / 8, abs(math.log(6 / 8)), abs(math.log(6 / 8))]
    assert box == pytest.approx(sum(v - 1 / 18 for v in t) / 4)


class _ZeroPooler(nn.Module):
    def forward(self, features, rois):
        return torch.zeros(rois.shape[0], 1, 1, 1)


def _roi_heads():
    pred = FastRCNNPredictor(in_features=1, num_classes=3)
    for p in pred.parameters():
        nn.init.zeros_(p)  # logits 0 -> CE log(3); deltas 0
    return RoIHeads(pooler=_ZeroPooler(), box_head=nn.Flatten(), predictor=pred, cfg=RoIHeadsConfig())


def test_roi_losses_hand_computed_with_gt_added_and_dynamic_threshold():
    heads = _roi_heads()
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [20.0, 20.0, 30.0, 30.0]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2])}]
    losses, stats = heads.losses({}, proposals, torch.zeros(3, dtype=torch.int64), targets)
    # candidates: 3 proposals + the gt box -> IoU (1, 0.5, 0, 1); fg >= 0.5: 3 positives, 1 negative
    assert stats["proposal_max_ious"][0].tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert float(losses["loss_classifier"].detach()) == pytest.approx(math.log(3))
    # the IoU-0.5 proposal: targets (0, 10 * -5/20, 0, 5 * log(1/2)) with weights (10, 10, 5, 5)
    dy, dh = 2.5, 5 * math.log(2)
    assert float(losses["loss_box_reg"].detach()) == pytest.approx((dy - 1 / 18 + dh - 1 / 18) / 4)
    errs = sorted(stats["pos_reg_targets"][0].sum(1).tolist())
    assert errs == pytest.approx([0.0, 0.0, dy + dh])
    # Dynamic R-CNN: threshold 0.6 turns the IoU-0.5 proposal into background, beta changes the loss shape
    losses, stats = heads.losses({}, proposals, torch.zeros(3, dtype=torch.int64), targets, fg_iou_thresh=0.6)
    assert stats["pos_reg_targets"][0].shape == (2, 4)
    assert float(losses["loss_box_reg"].detach()) == 0.0
    losses, _ = heads.losses({}, proposals, torch.zeros(3, dtype=torch.int64), targets, box_beta=1.0)
    assert float(losses["loss_box_reg"].detach()) == pytest.approx((0.5 * dy**2 if dy < 1 else dy - 0.5) / 4 + (dh - 0.5) / 4)
