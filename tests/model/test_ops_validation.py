"""Malformed arguments to the public ops are refused with a ValueError that names the function,
the argument, the expected shape and the shape that came (not an IndexError from a kernel, nor a
silently wrong answer: nms used to read the 5th column of (N, 5) boxes as area)."""

from __future__ import annotations

import re

import pytest
import torch

from model.ops import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    multiscale_roi_align,
    nms,
    remove_small_boxes,
    roi_align,
    roi_pool,
)

B4 = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
S3 = torch.tensor([0.9, 0.8, 0.7])
X = torch.rand(2, 3, 8, 8)
R5 = torch.tensor([[0.0, 0, 0, 4, 4], [1, 1, 1, 6, 7]])
META3 = torch.empty(3, device="meta")  # another device that exists on every machine


def refused(call, *fragments: str) -> str:
    """call() raises ValueError whose message contains every fragment (literally)."""
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_nms_boxes_with_five_columns_refused():
    refused(lambda: nms(torch.rand(3, 5), S3, 0.5), "nms: boxes must have shape (N, 4), got (3, 5)")
    refused(lambda: nms(torch.rand(4), S3, 0.5), "boxes must have shape (N, 4), got (4,)")


def test_nms_scores_must_match_boxes():
    refused(lambda: nms(B4, torch.rand(4), 0.5), "scores must have shape (N,) with N = 3 from boxes, got (4,)")
    refused(lambda: nms(B4, torch.rand(3, 2), 0.5), "nms: scores must have shape (N,), got (3, 2)")
    refused(lambda: nms(B4, META3, 0.5), "scores must be on the device of boxes (cpu), got meta")
    refused(lambda: nms(B4, S3 > 0.5, 0.5), "scores must be a floating or integer tensor, got torch.bool")
    refused(lambda: nms(B4.tolist(), S3, 0.5), "boxes must be a Tensor of shape (N, 4), got list")


def test_batched_nms_idxs_checked():
    refused(lambda: batched_nms(B4, S3, torch.tensor([0, 1]), 0.5),
            "batched_nms: idxs must have shape (N,) with N = 3 from boxes, got (2,)")
    refused(lambda: batched_nms(B4, S3, torch.tensor([0.0, 1, 1]), 0.5),
            "idxs must be an integer tensor, got torch.float32")
    refused(lambda: batched_nms(B4[:, :3], S3, torch.tensor([0, 1, 1]), 0.5), "boxes must have shape (N, 4), got (3, 3)")


def test_box_ops_shapes_checked():
    refused(lambda: box_area(torch.rand(3, 5)), "box_area: boxes must have shape (..., 4), got (3, 5)")
    refused(lambda: box_iou(B4, torch.rand(2, 3)), "box_iou: boxes2 must have shape (M, 4), got (2, 3)")
    refused(lambda: box_iou(torch.rand(2, 2, 4), B4), "boxes1 must have shape (N, 4), got (2, 2, 4)")
    refused(lambda: remove_small_boxes(torch.rand(4), 1.0), "remove_small_boxes: boxes must have shape (N, 4), got (4,)")
    refused(lambda: clip_boxes(B4, torch.tensor([10, 20, 30])), "clip_boxes: image_size must have shape (..., 2), got (3,)")
    refused(lambda: clip_boxes(B4, torch.tensor([[10, 20], [30, 40]])),
            "image_size (..., 2) must broadcast against boxes (..., 4): got image_size (2, 2) for boxes (3, 4)")


@pytest.mark.parametrize("op", [roi_align, roi_pool], ids=lambda f: f.__name__)
def test_roi_op_arguments_checked(op):
    name = op.__name__
    refused(lambda: op(X, R5[:, 1:], 2), f"{name}: rois must have shape (K, 5), got (2, 4)")
    refused(lambda: op(X[0], R5, 2), "input must have shape (N, C, H, W), got (3, 8, 8)")
    refused(lambda: op(X, R5, (2, 0)), "output_size must be two positive ints (oh, ow), got [2, 0]")
    refused(lambda: op(X, R5, (2, 2, 2)), "output_size must be two positive ints (oh, ow), got [2, 2, 2]")
    refused(lambda: op(X.long(), R5, 2), "input must be a floating tensor, got torch.int64")
    refused(lambda: op(X, R5.to("meta"), 2), "rois must be on the device of input (cpu), got meta")


def test_multiscale_roi_align_arguments_checked():
    feats = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    scales = [1 / 4, 1 / 8]
    refused(lambda: multiscale_roi_align([], R5, 2, [], 2), "features must be a non-empty list")
    refused(lambda: multiscale_roi_align(feats, R5, 2, scales[:1], 2),
            "spatial_scales must have one scale per map (2), got 1")
    refused(lambda: multiscale_roi_align(feats, R5, 2, [0.25, 0.2], 2), "spatial_scales must be powers of 2")
    refused(lambda: multiscale_roi_align([feats[0], torch.rand(2, 4, 8, 8)], R5, 2, scales, 2),
            "features[1] must have shape (N, C, H1, W1) with C = 3 from features[0], got (2, 4, 8, 8)")
    refused(lambda: multiscale_roi_align([feats[0], feats[1].double()], R5, 2, scales, 2),
            "features[1] must have the dtype of features[0] (torch.float32), got torch.float64")
    refused(lambda: multiscale_roi_align(feats, R5[:, :4], 2, scales, 2),
            "multiscale_roi_align: rois must have shape (K, 5), got (2, 4)")


def test_well_formed_calls_are_not_refused():
    # the checks bind N across arguments and accept every dtype the ops support
    assert nms(B4.half(), S3, 0.5).tolist() == [0, 2]
    assert batched_nms(B4.int(), S3, torch.tensor([0, 1, 1], dtype=torch.int32), 0.5).tolist() == [0, 1, 2]
    assert box_area(B4.view(3, 1, 4)).shape == (3, 1)
    assert clip_boxes(B4.view(3, 1, 4), torch.tensor([[[5, 5]]])).shape == (3, 1, 4)
    assert roi_align(X, R5, 2).shape == (2, 3, 2, 2)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


def test_message_names_function_argument_expected_and_got():
    msg = refused(lambda: nms(torch.rand(7, 5), torch.rand(7), 0.5))
    assert re.fullmatch(r"nms: boxes must have shape \(N, 4\), got \(7, 5\)", msg)
