"""Dynamic R-CNN schedules (Zhang et al., ECCV 2020): the RoI head's positive IoU threshold and the
smooth-L1 beta of its box loss follow the statistics of the proposals during training.

Dynamic label assignment: each iteration records, per image with ground truth, the K_I-th largest
IoU between a proposal and its best-matching ground-truth box, and stores the mean over the batch's
images. Every C iterations the threshold becomes the mean of the stored values (the "IoU history"),
never below its initial value: early proposals are poor and a lower threshold would make noise
positive.

Dynamic smooth L1: each iteration records the K_beta-th smallest regression error of the positive
RoIs (K_beta per image, so the quantile does not move with the batch size); a RoI's error is the
mean |dx|, |dy| of its regression target (how far its centre is off). Every C iterations beta
becomes the median of the stored values, never above its initial value: a smaller beta lets the
small errors of good proposals keep a large gradient. A median of ~0 (no positives yet) keeps the
current beta.

Defaults as in the paper: K_I = 75, K_beta = 10, C = 100, initial threshold 0.4, initial beta 1.0.
"""

from __future__ import annotations

import statistics

import torch

_EPS = 1e-5


class DynamicRCNN:
    def __init__(self, *, k_iou: int = 75, k_beta: int = 10, interval: int = 100,
                 initial_iou: float = 0.4, initial_beta: float = 1.0):
        self.k_iou, self.k_beta, self.interval = k_iou, k_beta, interval
        self.initial_iou, self.initial_beta = initial_iou, initial_beta
        self.iou_thresh = initial_iou
        self.beta = initial_beta
        self.iou_history: list[float] = []
        self.beta_history: list[float] = []
        self.iteration = 0

    @staticmethod
    def kth_largest_iou(proposal_max_ious: torch.Tensor, k: int) -> float:
        """Args: proposal_max_ious: Tensor[P], each proposal's IoU with its best ground-truth box."""
        k = min(k, proposal_max_ious.numel())
        return float(torch.topk(proposal_max_ious.detach().float(), k).values[-1])

    @staticmethod
    def regression_errors(pos_reg_targets: list[torch.Tensor]) -> torch.Tensor:
        """Per positive RoI, the mean of |dx| and |dy| of its regression target (the centre offset,
        in the box coder's weighted units). Args: per image Tensor[pos_i, 4]. Returns Tensor[N]."""
        parts = [t.detach().float().abs()[:, :2].mean(dim=1) for t in pos_reg_targets if t.numel()]
        return torch.cat(parts) if parts else torch.zeros(0)

    def observe(self, proposal_max_ious: list[torch.Tensor], pos_reg_targets: list[torch.Tensor]) -> None:
        """Record one iteration's statistics, then advance; every `interval` iterations update.

        Args:
            proposal_max_ious: per image, Tensor[P_i]: each RoI candidate's IoU with its best
                ground-truth box (images without boxes are left out of the mean).
            pos_reg_targets: per image, Tensor[pos_i, 4]: regression targets of the positive RoIs.
        """
        per_image = [self.kth_largest_iou(p, self.k_iou) for p in proposal_max_ious
                     if p.numel() > 0 and float(p.max()) > 0]
        if per_image:
            self.iou_history.append(sum(per_image) / len(per_image))
        errors = self.regression_errors(pos_reg_targets)
        if errors.numel() > 0:
            k = min(self.k_beta * max(len(proposal_max_ious), 1), errors.numel())
            self.beta_history.append(float(torch.kthvalue(errors, k).values))
        self.iteration += 1
        if self.iteration % self.interval == 0:
            self.update()

    def update(self) -> None:
        if self.iou_history:
            self.iou_thresh = max(self.initial_iou, sum(self.iou_history) / len(self.iou_history))
        if self.beta_history:
            median = statistics.median(self.beta_history)
            if median >= _EPS:
                self.beta = min(self.initial_beta, median)
        self.iou_history, self.beta_history = [], []

    def state_dict(self) -> dict:
        return {
            "iou_thresh": self.iou_thresh, "beta": self.beta, "iteration": self.iteration,
            "iou_history": list(self.iou_history), "beta_history": list(self.beta_history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iou_thresh = float(state["iou_thresh"])
        self.beta = float(state["beta"])
        self.iteration = int(state["iteration"])
        self.iou_history = [float(v) for v in state["iou_history"]]
        self.beta_history = [float(v) for v in state["beta_history"]]
