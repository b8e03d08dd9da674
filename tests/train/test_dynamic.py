"""Dynamic R-CNN statistics on hand-computed cases."""

import pytest
import torch

from train.dynamic import DynamicRCNN


def test_kth_largest_iou():
    ious = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert DynamicRCNN.kth_largest_iou(ious, 1) == pytest.approx(0.9)
    assert DynamicRCNN.kth_largest_iou(ious, 3) == pytest.approx(0.5)
    assert DynamicRCNN.kth_largest_iou(ious, 75) == pytest.approx(0.1)  # fewer than K: the smallest


def test_threshold_is_mean_of_per_iteration_means_every_interval():
    d = DynamicRCNN(k_iou=2, k_beta=1, interval=2, initial_iou=0.4, initial_beta=1.0)
    # iteration 1: image 0 -> 2nd largest of (0.9, 0.8, 0.2) = 0.8; image 1 -> 0.6; mean 0.7
    d.observe([torch.tensor([0.9, 0.2, 0.8]), torch.tensor([0.6, 0.7])], [])
    assert d.iou_thresh == 0.4  # not updated before `interval` iterations
    # iteration 2: one image 0.5; an image without boxes (all zero IoU) is left out
    d.observe([torch.tensor([0.5, 0.5, 0.1]), torch.zeros(4)], [])
    assert d.iou_thresh == pytest.approx((0.7 + 0.5) / 2)
    assert d.iou_history == []


def test_threshold_never_below_initial():
    d = DynamicRCNN(k_iou=1, interval=1, initial_iou=0.4)
    d.observe([torch.tensor([0.2, 0.1])], [])
    assert d.iou_thresh == 0.4


def test_beta_is_median_of_kth_smallest_errors():
    d = DynamicRCNN(k_iou=1, k_beta=2, interval=3, initial_beta=1.0)
    # errors are mean(|dx|, |dy|) per positive; K_beta = 2 per image, 1 image -> 2nd smallest
    t1 = torch.tensor([[0.2, 0.4, 9.0, 9.0], [0.1, 0.1, 0.0, 0.0], [-0.6, 0.2, 0.0, 0.0]])  # 0.3, 0.1, 0.4
    d.observe([torch.tensor([0.9])], [t1])  # 2nd smallest: 0.3
    t2 = torch.tensor([[0.5, 0.5, 0, 0], [0.7, 0.9, 0, 0]])  # 0.5, 0.8 -> 0.8
    d.observe([torch.tensor([0.9])], [t2])
    t3 = torch.tensor([[0.05, 0.15, 0, 0], [0.2, 0.0, 0, 0], [1.0, 1.0, 0, 0]])  # 0.1, 0.1, 1.0 -> 0.1
    d.observe([torch.tensor([0.9])], [t3])
    assert d.beta == pytest.approx(0.3)  # median of (0.3, 0.8, 0.1)


def test_beta_scales_k_with_images_and_caps_at_initial():
    d = DynamicRCNN(k_iou=1, k_beta=1, interval=1, initial_beta=0.5)
    # two images -> k = 2 over the pooled errors (0.9, 0.7, 3.0) -> 0.9, capped at 0.5
    d.observe([torch.tensor([0.9]), torch.tensor([0.8])],
              [torch.tensor([[0.9, 0.9, 0, 0]]), torch.tensor([[0.7, 0.7, 0, 0], [3.0, 3.0, 0, 0]])])
    assert d.beta == 0.5
    # k = 1 of (0.2): below the cap
    d.observe([torch.tensor([0.9])], [torch.tensor([[0.2, 0.2, 0, 0]])])
    assert d.beta == pytest.approx(0.2)
    # no positives and a zero median keep the current beta
    d.observe([torch.tensor([0.9])], [torch.zeros(0, 4)])
    d.observe([torch.tensor([0.9])], [torch.zeros(1, 4)])
    assert d.beta == pytest.approx(0.2)


def test_state_dict_round_trip_continues_identically():
    a = DynamicRCNN(k_iou=1, k_beta=1, interval=3)
    a.observe([torch.tensor([0.6])], [torch.tensor([[0.3, 0.3, 0, 0]])])
    b = DynamicRCNN(k_iou=1, k_beta=1, interval=3)
    b.load_state_dict(a.state_dict())
    for d in (a, b):
        d.observe([torch.tensor([0.8])], [torch.tensor([[0.5, 0.5, 0, 0]])])
        d.observe([torch.tensor([0.7])], [torch.tensor([[0.1, 0.1, 0, 0]])])
    assert (a.iou_thresh, a.beta) == (b.iou_thresh, b.beta)
    assert a.iou_thresh == pytest.approx(0.7) and a.beta == pytest.approx(0.3)
