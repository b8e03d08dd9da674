"""RoI heads: pool each proposal's features, two FC layers, class scores and class-specific boxes.

Shape shorthand: R RoIs over the whole batch, C classes including background (class 0), D feature
channels, S the pooled size (7). RoIs are (batch_idx, x1, y1, x2, y2) in resized-image pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.box_coder import BoxCoder
from model.config import RoIHeadsConfig
from model.matching import assign, sample, smooth_l1
from model.ops import clip_boxes, multiscale_roi_align, roi_pool


class MultiScalePooler(nn.Module):
    """RoIAlign over FPN levels, each RoI from the level its size maps to (FPN paper, eq. 1)."""

    def __init__(self, *, featmap_names: tuple[str, ...], strides: list[int], output_size: int,
                 sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """rois (R, 5) -> (R, D, S, S)."""
        feats = [features[n] for n in self.featmap_names]
        return multiscale_roi_align(feats, rois, self.output_size, self.scales, self.sampling_ratio,
                                    224, 4, self.aligned)


class RoIPooler(nn.Module):
    """Max RoI pooling on one map (the Fast/Faster R-CNN paper's VGG16 head)."""

    def __init__(self, *, featmap_name: str, stride: int, output_size: int):
        super().__init__()
        self.featmap_name = featmap_name
        self.scale = 1.0 / stride
        self.output_size = (output_size, output_size)

    def forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        return roi_pool(features[self.featmap_name], rois, self.output_size, self.scale)


class TwoMLPHead(nn.Module):
    """flatten -> fc6 -> ReLU -> fc7 -> ReLU. (R, D, S, S) -> (R, representation)."""

    def __init__(self, *, in_features: int, representation: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation)
        self.fc7 = nn.Linear(representation, representation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """(R, representation) -> class logits (R, C), class-specific deltas (R, C*4)."""

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    def __init__(self, *, pooler: nn.Module, box_head: nn.Module, predictor: FastRCNNPredictor, cfg: RoIHeadsConfig):
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.box_predictor = predictor
        self.cfg = cfg
        self.box_coder = BoxCoder(cfg.box_reg_weights)

    def forward(self, features: dict[str, torch.Tensor], proposals: torch.Tensor, batch_idx: torch.Tensor,
                image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """proposals (R, 4), batch_idx (R,) -> (scores (R, C) softmax, boxes (R, C, 4) decoded, clipped)."""
        rois = torch.cat([batch_idx[:, None].to(proposals.dtype), proposals], dim=1)
        logits, deltas = self.box_predictor(self.box_head(self.pooler(features, rois)))
        boxes = self.box_coder.decode(deltas, proposals)  # (R, C, 4)
        boxes = clip_boxes(boxes, image_sizes.to(boxes.dtype)[batch_idx][:, None, :])
        return F.softmax(logits, dim=-1), boxes

    def losses(self, features: dict[str, torch.Tensor], proposals: torch.Tensor, batch_idx: torch.Tensor,
               targets: list[dict[str, torch.Tensor]], *, fg_iou_thresh: float | None = None,
               box_beta: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Training losses on proposals (detached) plus each image's gt boxes.

        fg_iou_thresh / box_beta override the config (Dynamic R-CNN). Returns (losses, stats) with
        stats["proposal_max_ious"]: per image Tensor[P_i] (max IoU of each proposal with any gt) and
        stats["pos_reg_targets"]: per image Tensor[pos_i, 4] (|encoded targets| of the positives).
        """
        cfg = self.cfg
        fg = cfg.fg_iou_thresh if fg_iou_thresh is None else fg_iou_thresh
        # Background ends where foreground begins when the threshold moves (Dynamic R-CNN).
        bg = cfg.bg_iou_thresh if fg_iou_thresh is None else fg_iou_thresh
        beta = cfg.box_beta if box_beta is None else box_beta
        rois, labels_all, reg_all, max_ious, pos_targets = [], [], [], [], []
        for i, t in enumerate(targets):
            props = torch.cat([proposals[batch_idx == i].detach(), t["boxes"].to(proposals.dtype)])
            labels, matched, iou = assign(props, t["boxes"], t["labels"], fg_thresh=fg, bg_thresh=bg,
                                          bg_lo=cfg.bg_iou_lo)
            max_ious.append(iou)
            pos, neg = sample(labels, batch_size=cfg.batch_size_per_image, positive_fraction=cfg.positive_fraction)
            keep = torch.cat([pos, neg])
            reg = self.box_coder.encode(props[keep], matched[keep]) if t["boxes"].numel() else torch.zeros(
                keep.numel(), 4, device=props.device)
            pos_targets.append(reg[: pos.numel()].abs().detach())
            rois.append(torch.cat([torch.full((keep.numel(), 1), float(i), device=props.device), props[keep]], 1))
            lab = labels[keep].clone()
            lab[pos.numel():] = 0
            labels_all.append(lab)
            reg_all.append(reg)
        rois_t = torch.cat(rois)
        labels = torch.cat(labels_all)
        reg_t = torch.cat(reg_all)
        logits, deltas = self.box_predictor(self.box_head(self.pooler(features, rois_t)))
        loss_cls = F.cross_entropy(logits, labels)
        pos = torch.nonzero(labels > 0).flatten()
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[pos, labels[pos]]  # (pos, 4) of the gt class
        loss_box = smooth_l1(deltas, reg_t[pos], beta) / max(1, labels.numel())
        losses = {"loss_classifier": loss_cls * cfg.loss_weight_classifier,
                  "loss_box_reg": loss_box * cfg.loss_weight_box}
        return losses, {"proposal_max_ious": max_ious, "pos_reg_targets": pos_targets}


def build_pooler(cfg: RoIHeadsConfig, names: list[str], strides: list[int]) -> tuple[nn.Module, int]:
    """Returns (pooler, number of pooled positions S*S)."""
    stride_of = dict(zip(names, strides))
    missing = [n for n in cfg.featmap_names if n not in stride_of]
    if missing:
        raise ValueError(f"roi_heads.featmap_names {missing} not produced by the backbone ({names})")
    if cfg.pooler == "align":
        pooler = MultiScalePooler(featmap_names=cfg.featmap_names, strides=[stride_of[n] for n in cfg.featmap_names],
                                  output_size=cfg.output_size, sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned)
    elif cfg.pooler == "pool":
        if len(cfg.featmap_names) != 1:
            raise ValueError("RoIPool pools from exactly one feature map")
        pooler = RoIPooler(featmap_name=cfg.featmap_names[0], stride=stride_of[cfg.featmap_names[0]],
                           output_size=cfg.output_size)
    else:
        raise ValueError(f"unknown pooler {cfg.pooler!r}; choose align or pool")
    return pooler, int(math.prod((cfg.output_size, cfg.output_size)))
