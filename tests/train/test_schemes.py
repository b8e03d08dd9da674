"""The training API the schemes use: end-to-end losses, one part at a time, and proposals without
the RPN's loss machinery (4-step step 2), on the tiny preset and real synthetic-shapes images."""

from __future__ import annotations

import copy

import pytest
import torch

from model import apply_overrides, build_model, preset
from model.transform import preprocess
from train.data import resize_targets
from train.schemes import stage_losses, stages
from train.shapes import SyntheticShapes

# Test counts smaller than train counts, so the two are told apart.
SMALL = ["transform.min_size=96", "transform.max_size=128", "rpn.pre_nms_top_n_train=100",
         "rpn.post_nms_top_n_train=50", "rpn.pre_nms_top_n_test=60", "rpn.post_nms_top_n_test=20",
         "roi_heads.batch_size_per_image=32"]
RPN_TERMS = {"loss_objectness", "loss_rpn_box_reg"}
ROI_TERMS = {"loss_classifier", "loss_box_reg"}


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticShapes(split="train", size=2)
    images, targets = zip(*(ds[i] for i in range(2)), strict=True)
    cfg = apply_overrides(preset("tiny", num_classes=len(ds.class_names)), SMALL)
    b = preprocess(list(images), cfg.transform)
    return cfg, b.images, b.image_sizes, resize_targets(list(targets), b.image_sizes, b.original_sizes)


def _net(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def _per_image(batch_idx: torch.Tensor) -> list[int]:
    return torch.bincount(batch_idx, minlength=2).tolist()


def test_proposals_are_forwards_rpn_proposals(batch):
    cfg, images, sizes, _ = batch
    net = _net(cfg).eval()
    seen = []
    hook = net.rpn.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        net(images, sizes)
    hook.remove()
    boxes, batch_idx = net.proposals(images, sizes)
    assert torch.equal(boxes, seen[0][0]) and torch.equal(batch_idx, seen[0][1])
    assert max(_per_image(batch_idx)) == 20  # the test count: rpn.post_nms_top_n_test
    assert not boxes.requires_grad


def test_train_count_proposals_are_what_end_to_end_trains_the_roi_head_on(batch):
    cfg, images, sizes, targets = batch
    net = _net(cfg).eval()  # eval: batch-norm statistics the same for both calls
    boxes, batch_idx = net.proposals(images, sizes, pre_nms_top_n=100, post_nms_top_n=50)
    feats = list(net.backbone(images, sizes).values())
    _, (ref_boxes, ref_idx) = net.rpn.losses_and_proposals(feats, sizes, tuple(images.shape[-2:]), targets)
    assert torch.equal(boxes, ref_boxes) and torch.equal(batch_idx, ref_idx)
    assert max(_per_image(batch_idx)) == 50


def test_proposals_consume_no_random_numbers_but_rpn_losses_do(batch):
    cfg, images, sizes, targets = batch
    net = _net(cfg)
    before = torch.get_rng_state()
    net.proposals(images, sizes)
    net.proposals(images, sizes, pre_nms_top_n=100, post_nms_top_n=50)
    assert torch.equal(torch.get_rng_state(), before)
    net.rpn_losses(images, sizes, targets)  # samples anchors: the check above would see this
    assert not torch.equal(torch.get_rng_state(), before)


def test_alternating_step_2_draws_random_numbers_only_for_the_roi_head(batch):
    """Step 2 = the frozen step-1 network's proposals (no RNG) + the RoI losses (RoI sampling)."""
    cfg, images, sizes, targets = batch
    net = _net(cfg).train()
    proposer = copy.deepcopy(net).requires_grad_(False).eval()
    step2 = stages("alternating")[1]
    torch.manual_seed(1)
    losses, stats = stage_losses(step2, net, images, sizes, targets, proposer=proposer)
    after_step = torch.get_rng_state()
    torch.manual_seed(1)
    props = proposer.proposals(images, sizes, pre_nms_top_n=100, post_nms_top_n=50)
    ref, _ = net.roi_losses(images, sizes, targets, proposals=props)
    assert torch.equal(torch.get_rng_state(), after_step)
    assert set(losses) == ROI_TERMS and all(torch.equal(losses[k], ref[k]) for k in ROI_TERMS)
    # the RoI head saw the proposer's proposals (plus each image's gt boxes)
    assert [len(v) for v in stats["proposal_max_ious"]] == [
        n + len(t["boxes"]) for n, t in zip(_per_image(props[1]), targets, strict=True)]


def test_end_to_end_losses_equal_the_parts_in_one_backbone_pass(batch):
    cfg, images, sizes, targets = batch
    net = _net(cfg).eval()  # eval: the two backbone passes of the parts see the same statistics
    calls = []
    net.backbone.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(2)
    joint, _ = net.losses(images, sizes, targets)
    assert len(calls) == 1
    torch.manual_seed(2)  # same draws in the same order: RPN sampling, then RoI sampling
    rpn = net.rpn_losses(images, sizes, targets)
    roi, _ = net.roi_losses(images, sizes, targets)  # this RPN's train-count proposals
    assert len(calls) == 3
    assert set(joint) == RPN_TERMS | ROI_TERMS
    for k, v in {**rpn, **roi}.items():
        assert torch.equal(joint[k], v), k


def test_each_part_trains_only_its_own_layers(batch):
    cfg, images, sizes, targets = batch
    net = _net(cfg)
    sum(net.rpn_losses(images, sizes, targets).values()).backward()
    assert all(p.grad is None for p in net.roi_heads.parameters())
    assert all(p.grad is not None for p in net.rpn.parameters())
    net.zero_grad(set_to_none=True)
    sum(net.roi_losses(images, sizes, targets)[0].values()).backward()
    assert all(p.grad is None for p in net.rpn.parameters())  # proposals carry no gradient
    assert all(p.grad is not None for p in net.roi_heads.parameters())


@pytest.mark.parametrize("scheme, terms", [
    ("end2end", [RPN_TERMS | ROI_TERMS]),
    ("alternating", [RPN_TERMS, ROI_TERMS, RPN_TERMS, ROI_TERMS]),
])
def test_each_stage_computes_exactly_the_terms_it_trains(batch, scheme, terms):
    cfg, images, sizes, targets = batch
    net = _net(cfg)
    got = [set(stage_losses(s, net, images, sizes, targets)[0]) for s in stages(scheme)]
    assert got == terms


def test_losses_reject_a_target_count_mismatch(batch):
    cfg, images, sizes, targets = batch
    net = _net(cfg)
    for call in (net.losses, net.rpn_losses, net.roi_losses):
        with pytest.raises(ValueError, match="2 images but 1 targets"):
            call(images, sizes, targets[:1])
