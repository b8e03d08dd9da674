"""Region Proposal Network: head, proposal selection and its training losses.

Shape shorthand: B images, L feature levels, A anchors per cell at a level, Hl, Wl level size,
N = sum_l Hl*Wl*A anchors per image, D backbone channels. Proposals are xyxy in resized-image
pixels. Everything after the head is batched over images (no Python loop over images or boxes),
so one traced graph serves any batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.anchors import AnchorGenerator
from model.backbones.padding import anchors_inside
from model.box_coder import BoxCoder
from model.config import RPNConfig
from model.matching import assign, sample, smooth_l1
from model.ops import batched_nms, clip_boxes, remove_small_boxes


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then objectness (A sigmoid logits or 2A softmax logits) and 4A deltas per cell."""

    def __init__(self, *, in_channels: int, num_anchors: int, objectness: str = "sigmoid", conv_channels: int = 0):
        super().__init__()
        if objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax', not {objectness!r}")
        mid = conv_channels or in_channels
        # Nested Sequential keeps torchvision's key layout: conv.0.0.weight.
        self.conv = nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1), nn.ReLU(inplace=True)))
        self.objectness = objectness
        self.cls_logits = nn.Conv2d(mid, num_anchors * (2 if objectness == "softmax" else 1), 1)
        self.bbox_pred = nn.Conv2d(mid, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [(B, D, Hl, Wl)] -> logits (B, N, 1 or 2), deltas (B, N, 4), in anchor order."""
        logits, deltas = [], []
        k = 2 if self.objectness == "softmax" else 1
        a = self.bbox_pred.out_channels // 4  # anchors per location
        for f in features:
            t = self.conv(f)
            # (B, A*k, H, W) -> (B, A, k, H, W) -> (B, H, W, A, k) -> (B, H*W*A, k). Sizes spelled out,
            # no -1: under the exporters' symbolic H, W each inferred -1 cost about a second (the ONNX
            # exporter's re-trace of the demo model: 23-30 s with these reshapes, 15-18 s without).
            logits.append(self.cls_logits(t).unflatten(1, (a, k)).permute(0, 3, 4, 1, 2).flatten(1, 3))
            deltas.append(self.bbox_pred(t).unflatten(1, (a, 4)).permute(0, 3, 4, 1, 2).flatten(1, 3))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


def objectness_score(logits: torch.Tensor) -> torch.Tensor:
    """(..., 1) sigmoid logits or (..., 2) softmax logits [bg, fg] -> (...) foreground logit.

    For a 2-way softmax, fg - bg is the logit of p(fg), so both heads rank and threshold alike.
    """
    if logits.shape[-1] == 1:
        return logits[..., 0]
    return logits[..., 1] - logits[..., 0]


class RPN(nn.Module):
    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, cfg: RPNConfig,
                 drop_padding_anchors: bool = False):
        super().__init__()
        self.head = head
        self.drop_padding_anchors = drop_padding_anchors  # with a pad-invariant backbone
        self.anchor_generator = anchor_generator
        self.cfg = cfg
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, features: list[torch.Tensor], image_sizes: torch.Tensor, batch_hw: tuple[int, int], *,
                pre_nms_top_n: int | None = None, post_nms_top_n: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposals: no targets, so no matching, no sampling, no random numbers.

        pre_nms_top_n / post_nms_top_n default to the test counts (inference); training passes the
        train counts. Returns (boxes Tensor[P, 4], batch_idx Tensor[P] int64): each image's proposals
        in decreasing objectness.
        """
        logits, deltas = self.head(features)
        anchors, level_sizes = self._anchors(features, batch_hw)
        return self.select_proposals(
            logits.detach(), deltas.detach(), anchors, level_sizes, image_sizes,
            pre_nms_top_n=self.cfg.pre_nms_top_n_test if pre_nms_top_n is None else pre_nms_top_n,
            post_nms_top_n=self.cfg.post_nms_top_n_test if post_nms_top_n is None else post_nms_top_n)

    def _anchors(self, features: list[torch.Tensor], batch_hw: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
        per_level = self.anchor_generator(batch_hw, [tuple(f.shape[-2:]) for f in features],
                                          device=features[0].device)
        return torch.cat(per_level), [a.shape[0] for a in per_level]

    def select_proposals(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                         level_sizes: list[int], image_sizes: torch.Tensor, *, pre_nms_top_n: int,
                         post_nms_top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per level top-n by objectness, decode, clip, drop small and low-score boxes, NMS per image
        and level, keep the post_nms_top_n best per image.

        logits (B, N, k), deltas (B, N, 4), anchors (N, 4), image_sizes (B, 2) -> boxes (P, 4), batch_idx (P,)
        """
        B = logits.shape[0]
        scores = objectness_score(logits)  # (B, N)
        if self.drop_padding_anchors:
            scores = scores.masked_fill(~anchors_inside(anchors, image_sizes), float("-inf"))
        top_idx, top_lvl = [], []
        start = 0
        for lvl, n in enumerate(level_sizes):
            k = torch.sym_min(pre_nms_top_n, n)
            idx = scores[:, start:start + n].topk(k, dim=1).indices + start  # (B, k)
            top_idx.append(idx)
            top_lvl.append(torch.full_like(idx, lvl))
            start += n
        idx = torch.cat(top_idx, dim=1)  # (B, M)
        lvl = torch.cat(top_lvl, dim=1)
        M = idx.shape[1]
        img = torch.arange(B, device=idx.device)[:, None].expand(B, M)
        s = torch.gather(scores, 1, idx).reshape(-1)
        d = torch.gather(deltas, 1, idx[..., None].expand(B, M, 4)).reshape(-1, 4)
        boxes = self.box_coder.decode(d, anchors[idx.reshape(-1)])[:, 0]  # (B*M, 4)
        img, lvl = img.reshape(-1), lvl.reshape(-1)
        boxes = clip_boxes(boxes, image_sizes.to(boxes.dtype)[img])
        prob = torch.sigmoid(s)
        keep = remove_small_boxes(boxes, self.cfg.min_size)
        if self.drop_padding_anchors:  # fewer valid anchors than top-n: the -inf ones were picked
            keep = keep[s[keep] > float("-inf")]
        if self.cfg.score_thresh > 0:
            keep = keep[prob[keep] >= self.cfg.score_thresh]
        boxes, prob, img, lvl = boxes[keep], prob[keep], img[keep], lvl[keep]
        keep = batched_nms(boxes, prob, img * len(level_sizes) + lvl, self.cfg.nms_thresh)
        keep = keep[rank_within_group(img[keep], B) < post_nms_top_n]
        return boxes[keep], img[keep]

    def losses(self, features: list[torch.Tensor], image_sizes: torch.Tensor, batch_hw: tuple[int, int],
               targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training losses {loss_objectness, loss_rpn_box_reg} (the RPN alone: alternating steps 1, 3)."""
        logits, deltas = self.head(features)
        anchors, _ = self._anchors(features, batch_hw)
        return self._losses(logits, deltas, anchors, image_sizes, targets)

    def losses_and_proposals(self, features: list[torch.Tensor], image_sizes: torch.Tensor,
                             batch_hw: tuple[int, int], targets: list[dict[str, torch.Tensor]]
                             ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """End-to-end training: one head evaluation gives the losses and the detached proposals
        (train counts) the RoI heads train on. Returns (losses, (boxes (P, 4), batch_idx (P,)))."""
        logits, deltas = self.head(features)
        anchors, level_sizes = self._anchors(features, batch_hw)
        losses = self._losses(logits, deltas, anchors, image_sizes, targets)
        proposals = self.select_proposals(logits.detach(), deltas.detach(), anchors, level_sizes, image_sizes,
                                          pre_nms_top_n=self.cfg.pre_nms_top_n_train,
                                          post_nms_top_n=self.cfg.post_nms_top_n_train)
        return losses, proposals

    def _losses(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, image_sizes: torch.Tensor,
                targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Match anchors to gt, sample a balanced minibatch per image (random), objectness + box losses.

        logits (B, N, k), deltas (B, N, 4), anchors (N, 4).
        """
        cfg = self.cfg
        labels, gt_boxes = [], []
        for i, t in enumerate(targets):
            lab, matched, _ = assign(anchors, t["boxes"], torch.ones_like(t["labels"]), fg_thresh=cfg.fg_iou_thresh,
                                     bg_thresh=cfg.bg_iou_thresh, allow_low_quality=True)
            if cfg.ignore_cross_boundary:
                h, w = image_sizes[i, 0], image_sizes[i, 1]
                inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
                lab = torch.where(inside, lab, torch.full_like(lab, -1))
            labels.append(lab)
            gt_boxes.append(matched)
        pos_all, neg_all = [], []
        N = anchors.shape[0]
        for i, lab in enumerate(labels):
            pos, neg = sample(lab, batch_size=cfg.batch_size_per_image, positive_fraction=cfg.positive_fraction)
            pos_all.append(pos + i * N)
            neg_all.append(neg + i * N)
        pos, neg = torch.cat(pos_all), torch.cat(neg_all)
        sampled = torch.cat([pos, neg])
        flat_logits = logits.reshape(-1, logits.shape[-1])
        target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        if logits.shape[-1] == 1:
            loss_obj = F.binary_cross_entropy_with_logits(flat_logits[sampled, 0], target.to(logits.dtype))
        else:
            loss_obj = F.cross_entropy(flat_logits[sampled], target)
        reg_t = self.box_coder.encode(anchors.repeat(len(targets), 1)[pos], torch.cat(gt_boxes)[pos])
        loss_box = smooth_l1(deltas.reshape(-1, 4)[pos], reg_t, cfg.box_beta) / max(1, sampled.numel())
        return {"loss_objectness": loss_obj * cfg.loss_weight_objectness,
                "loss_rpn_box_reg": loss_box * cfg.loss_weight_box}


def rank_within_group(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """group: Tensor[K] int64 in [0, num_groups) -> Tensor[K]: how many earlier elements share the group.

    Keeps "the first n per image" of a score-sorted list batched (no loop over images).
    """
    one_hot = (group[:, None] == torch.arange(num_groups, device=group.device)[None, :]).to(torch.int64)  # (K, G)
    return (one_hot.cumsum(0) * one_hot).sum(1) - 1

