"""Training schemes and parameter freezing.

end2end: the approximate joint training of the Faster R-CNN paper (section 3.2): one network, the
four losses summed, gradients of the RoI head stopping at the proposal coordinates.

alternating: the paper's 4-step alternating training, on one network:
  1. RPN:             backbone + RPN trained on the RPN losses.
  2. Fast R-CNN:      backbone + RoI head trained on the RoI-head losses, with the proposals of a
                      frozen copy of the step-1 network (the paper precomputes them).
  3. RPN tune:        shared backbone frozen; only the RPN layers trained.
  4. Fast R-CNN tune: backbone and RPN frozen; only the RoI head trained.
The paper starts step 2 from a second ImageNet-initialised backbone; here step 2 continues from the
step-1 backbone (there may be no pretrained weights to restart from, e.g. the tiny preset), so the
two networks share their features from step 2 on rather than from step 3.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    name: str
    trains_rpn: bool  # the RPN losses are computed and trained
    trains_roi: bool  # the RoI-head losses are computed and trained
    freeze: tuple[str, ...]  # parameter-name patterns kept frozen in this stage (besides the user's)
    proposals_from_previous_step: bool = False  # RoI head trained on the previous step's proposals (step 2)


def stages(scheme: str) -> list[Stage]:
    if scheme == "end2end":
        return [Stage("end2end", trains_rpn=True, trains_roi=True, freeze=())]
    if scheme == "alternating":
        return [
            Stage("1-rpn", trains_rpn=True, trains_roi=False, freeze=("roi_heads",)),
            Stage("2-fast-rcnn", trains_rpn=False, trains_roi=True, freeze=("rpn",),
                  proposals_from_previous_step=True),
            Stage("3-rpn-tune", trains_rpn=True, trains_roi=False, freeze=("backbone", "roi_heads")),
            Stage("4-fast-rcnn-tune", trains_rpn=False, trains_roi=True, freeze=("backbone", "rpn")),
        ]
    raise ValueError(f"unknown scheme {scheme!r} (end2end | alternating)")


def stage_losses(stage: Stage, net: nn.Module, images: torch.Tensor, image_sizes: torch.Tensor,
                 targets: list[dict[str, torch.Tensor]], *, proposer: nn.Module | None = None,
                 roi_fg_iou_thresh: float | None = None, roi_box_beta: float | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The losses a stage trains (only those: their sum is the step's loss) and the RoI-head stats.

    proposer: the previous step's network (frozen) whose proposals the RoI head trains on; it runs
    as at inference (no matching, no sampling, no random numbers), keeping as many proposals per
    image as training would (the train counts).
    """
    if stage.trains_rpn and stage.trains_roi:
        return net.losses(images, image_sizes, targets, roi_fg_iou_thresh=roi_fg_iou_thresh, roi_box_beta=roi_box_beta)
    if stage.trains_rpn:
        return net.rpn_losses(images, image_sizes, targets), {}
    proposals = None
    if proposer is not None:
        counts = proposer.config.rpn
        proposals = proposer.proposals(images, image_sizes, pre_nms_top_n=counts.pre_nms_top_n_train,
                                       post_nms_top_n=counts.post_nms_top_n_train)
    return net.roi_losses(images, image_sizes, targets, proposals=proposals, roi_fg_iou_thresh=roi_fg_iou_thresh,
                          roi_box_beta=roi_box_beta)


def parse_patterns(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """'backbone.layer1,rpn' -> ('backbone.layer1', 'rpn')."""
    if not text:
        return ()
    items = text.split(",") if isinstance(text, str) else text
    return tuple(p.strip() for p in items if p.strip())


def name_matches(name: str, pattern: str) -> bool:
    """A pattern selects a parameter by a dotted prefix (`backbone.layer1` selects
    `backbone.layer1.0.conv1.weight`, not `backbone.layer10...`) or by an fnmatch glob."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    return name == pattern or name.startswith(pattern + ".")


def set_trainable(net: nn.Module, frozen_patterns: tuple[str, ...], *, check: bool = True) -> list[str]:
    """requires_grad = False for parameters matched by any pattern, True for the others.

    Parameters that the model itself keeps frozen (requires_grad False at construction, e.g. a
    frozen-BN affine or a stem frozen by the preset) are remembered on first call and stay frozen.
    Returns the names of the frozen parameters. With `check`, a pattern matching nothing raises
    (a typo would otherwise silently train everything).
    """
    if not hasattr(net, "_frcnn_model_frozen"):
        net._frcnn_model_frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    names = [n for n, _ in net.named_parameters()]
    if check:
        for pattern in frozen_patterns:
            if not any(name_matches(n, pattern) for n in names):
                raise ValueError(f"freeze pattern {pattern!r} matches no parameter; "
                                 f"did you mean one of {_suggest(names, pattern)}?")
    frozen = []
    for name, p in net.named_parameters():
        freeze = name in net._frcnn_model_frozen or any(name_matches(name, pat) for pat in frozen_patterns)
        p.requires_grad_(not freeze)
        if freeze:
            frozen.append(name)
    return frozen


def _suggest(names: list[str], pattern: str) -> list[str]:
    """Module prefixes ending in the pattern's last part ('backbone.layer1' -> 'backbone.body.layer1'),
    else the top-level modules."""
    last = pattern.split(".")[-1]
    hits = sorted({".".join(n.split(".")[: i + 1]) for n in names for i, part in enumerate(n.split("."))
                   if part == last})
    return hits[:5] or sorted({n.split(".")[0] for n in names})
