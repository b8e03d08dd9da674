"""Training-target assignment: IoU matching, balanced sampling and the R-CNN losses.

Plain functions, each testable alone. Shape shorthand: P predictions (anchors or proposals),
G ground-truth boxes of one image. Match labels: >= 0 index of the matched gt, BELOW (-1)
background, BETWEEN (-2) ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ops import box_iou

BELOW = -1
BETWEEN = -2


def match(iou: torch.Tensor, *, fg_thresh: float, bg_thresh: float, bg_lo: float = 0.0,
          allow_low_quality: bool = False) -> torch.Tensor:
    """Assign each prediction to its best ground truth.

    iou: Tensor[G, P]. Returns Tensor[P] int64: gt index where max IoU >= fg_thresh, BELOW where
    bg_lo <= max IoU < bg_thresh, BETWEEN otherwise (including max IoU < bg_lo). With
    allow_low_quality, each gt's highest-IoU predictions (ties included) are matched to it too
    (the RPN rule that gives every gt at least one anchor).
    """
    if iou.numel() == 0:
        return torch.full((iou.shape[1],), BELOW, dtype=torch.int64, device=iou.device)
    best_iou, best_gt = iou.max(dim=0)
    matches = best_gt.clone()
    matches[best_iou < bg_thresh] = BELOW
    matches[(best_iou >= bg_thresh) & (best_iou < fg_thresh)] = BETWEEN
    if bg_lo > 0:
        matches[best_iou < bg_lo] = BETWEEN
    if allow_low_quality:
        best_per_gt = iou.max(dim=1).values  # (G,)
        # torchvision also matches a gt with no overlapping prediction at all (max IoU 0) to every
        # prediction; requiring IoU > 0 keeps such a gt from turning all anchors positive.
        pred_idx = torch.nonzero((iou == best_per_gt[:, None]) & (best_per_gt[:, None] > 0), as_tuple=True)[1]
        matches[pred_idx] = best_gt[pred_idx]
    return matches


def sample(labels: torch.Tensor, *, batch_size: int, positive_fraction: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced sampling. labels: Tensor[P] with 1 positive, 0 negative, -1 ignore.

    Returns (pos_idx, neg_idx): at most batch_size * positive_fraction positives, negatives
    filling the rest of batch_size, each chosen uniformly at random.
    """
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(batch_size * positive_fraction))
    n_neg = min(neg.numel(), batch_size - n_pos)
    pos = pos[torch.randperm(pos.numel(), device=pos.device, generator=generator)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device, generator=generator)[:n_neg]]
    return pos, neg


def assign(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, *, fg_thresh: float,
           bg_thresh: float, bg_lo: float = 0.0, allow_low_quality: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match predictions of one image to its gt.

    Returns (labels Tensor[P] int64: class id, 0 background, -1 ignored;
             matched_boxes Tensor[P, 4]: the matched gt box (any gt for non-positives);
             max_iou Tensor[P]).
    """
    P = pred_boxes.shape[0]
    if gt_boxes.numel() == 0:
        return (torch.zeros(P, dtype=torch.int64, device=pred_boxes.device),
                torch.zeros_like(pred_boxes), torch.zeros(P, device=pred_boxes.device))
    iou = box_iou(gt_boxes, pred_boxes)  # (G, P)
    m = match(iou, fg_thresh=fg_thresh, bg_thresh=bg_thresh, bg_lo=bg_lo, allow_low_quality=allow_low_quality)
    labels = gt_labels[m.clamp(min=0)].clone()
    labels[m == BELOW] = 0
    labels[m == BETWEEN] = -1
    return labels, gt_boxes[m.clamp(min=0)], iou.max(dim=0).values


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 (Huber with delta=beta, divided by beta): 0.5 x^2 / beta if |x| < beta else |x| - beta/2."""
    if beta < 1e-5:  # the quadratic part vanishes: plain L1 (avoids 0/0)
        return (pred - target).abs().sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
