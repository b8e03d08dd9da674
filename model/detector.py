"""Faster R-CNN (Ren et al. 2015): backbone -> RPN proposals -> RoI heads.

Shape shorthand: B images, H, W the padded batch, R RoIs over the batch, C classes (0 = background).
``forward`` is inference on a preprocessed batch and returns raw per-RoI outputs; detections come
from ``model.postprocess``. Training losses come from explicit calls with targets: ``losses``
(end to end), ``rpn_losses`` and ``roi_losses`` (one part each, 4-step training).
"""

from __future__ import annotations

import torch
from torch import nn

from model.anchors import AnchorGenerator
from model.backbones import Backbone, build_backbone
from model.config import ModelConfig
from model.postprocess import RawDetections
from model.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead, build_pooler
from model.rpn import RPN, RPNHead


class FasterRCNN(nn.Module):
    def __init__(self, *, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, config: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.config = config

    def _rpn_features(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(features.values())

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> RawDetections:
        """images (B, 3, H, W) preprocessed and padded; image_sizes (B, 2) int64 resized (h, w)."""
        features = self.backbone(images, image_sizes)
        batch_hw = (images.shape[-2], images.shape[-1])
        proposals, batch_idx = self.rpn(self._rpn_features(features), image_sizes, batch_hw)
        scores, boxes = self.roi_heads(features, proposals, batch_idx, image_sizes)
        return RawDetections(batch_idx, scores, boxes)

    @torch.no_grad()
    def proposals(self, images: torch.Tensor, image_sizes: torch.Tensor, *, pre_nms_top_n: int | None = None,
                  post_nms_top_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The RPN's proposals as forward makes them (test counts unless given): no targets, so no
        matching, no sampling, no random numbers. Step 2 of 4-step training proposes with this.

        Returns (boxes Tensor[P, 4] xyxy resized-image pixels, batch_idx Tensor[P] int64).
        """
        features = self.backbone(images, image_sizes)
        return self.rpn(self._rpn_features(features), image_sizes, (images.shape[-2], images.shape[-1]),
                        pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n)

    # Training losses. targets: per image {"boxes": (G, 4) xyxy in resized-image pixels,
    # "labels": (G,) int64 >= 1}. roi_fg_iou_thresh / roi_box_beta override the RoI heads' config
    # (Dynamic R-CNN); stats feed Dynamic R-CNN (see RoIHeads.losses).

    def losses(self, images: torch.Tensor, image_sizes: torch.Tensor, targets: list[dict[str, torch.Tensor]], *,
               roi_fg_iou_thresh: float | None = None, roi_box_beta: float | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """End-to-end training (approximate joint): one backbone pass, the RPN losses, and the RoI
        losses on this RPN's detached proposals (train counts). Returns (four losses, stats)."""
        features = self._train_features(images, image_sizes, targets)
        rpn_losses, (boxes, batch_idx) = self.rpn.losses_and_proposals(
            self._rpn_features(features), image_sizes, (images.shape[-2], images.shape[-1]), targets)
        roi_losses, stats = self.roi_heads.losses(features, boxes, batch_idx, targets,
                                                  fg_iou_thresh=roi_fg_iou_thresh, box_beta=roi_box_beta)
        return {**rpn_losses, **roi_losses}, stats

    def rpn_losses(self, images: torch.Tensor, image_sizes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
        """The RPN's losses alone {loss_objectness, loss_rpn_box_reg} (4-step training, steps 1 and 3)."""
        features = self._train_features(images, image_sizes, targets)
        return self.rpn.losses(self._rpn_features(features), image_sizes, (images.shape[-2], images.shape[-1]),
                               targets)

    def roi_losses(self, images: torch.Tensor, image_sizes: torch.Tensor, targets: list[dict[str, torch.Tensor]], *,
                   proposals: tuple[torch.Tensor, torch.Tensor] | None = None,
                   roi_fg_iou_thresh: float | None = None, roi_box_beta: float | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The RoI heads' losses alone {loss_classifier, loss_box_reg} (4-step training, steps 2 and 4).

        proposals: (boxes (P, 4), batch_idx (P,)) to train on, e.g. another network's
        (`proposals(...)`); None: this network's RPN proposals (train counts) from the same backbone
        pass, without the RPN's loss machinery.
        """
        features = self._train_features(images, image_sizes, targets)
        if proposals is None:
            with torch.no_grad():
                proposals = self.rpn(self._rpn_features(features), image_sizes, (images.shape[-2], images.shape[-1]),
                                     pre_nms_top_n=self.rpn.cfg.pre_nms_top_n_train,
                                     post_nms_top_n=self.rpn.cfg.post_nms_top_n_train)
        boxes, batch_idx = proposals
        return self.roi_heads.losses(features, boxes.detach(), batch_idx, targets,
                                     fg_iou_thresh=roi_fg_iou_thresh, box_beta=roi_box_beta)

    def _train_features(self, images: torch.Tensor, image_sizes: torch.Tensor,
                        targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        return self.backbone(images, image_sizes)


def build_model(cfg: ModelConfig) -> FasterRCNN:
    """The one builder: a FasterRCNN from its config (weights freshly initialised)."""
    backbone = build_backbone(cfg.backbone)
    anchors = AnchorGenerator(sizes=cfg.anchors.sizes, aspect_ratios=cfg.anchors.aspect_ratios)
    if len(cfg.anchors.sizes) != len(backbone.strides):
        raise ValueError(f"{len(cfg.anchors.sizes)} anchor levels for {len(backbone.strides)} feature maps")
    per_loc = set(anchors.num_anchors_per_location())
    if len(per_loc) != 1:
        raise ValueError("the shared RPN head needs the same number of anchors at every level")
    head = RPNHead(in_channels=backbone.out_channels, num_anchors=per_loc.pop(),
                   objectness=cfg.rpn.objectness, conv_channels=cfg.rpn.conv_channels)
    rpn = RPN(head=head, anchor_generator=anchors, cfg=cfg.rpn, drop_padding_anchors=cfg.backbone.pad_invariant)
    names = list(backbone.names) + (["pool"] if len(backbone.strides) > len(backbone.names) else [])
    pooler, positions = build_pooler(cfg.roi_heads, names, backbone.strides)
    rep = cfg.roi_heads.representation_size
    box_head = TwoMLPHead(in_features=backbone.out_channels * positions, representation=rep)
    predictor = FastRCNNPredictor(in_features=rep, num_classes=cfg.num_classes)
    roi_heads = RoIHeads(pooler=pooler, box_head=box_head, predictor=predictor, cfg=cfg.roi_heads)
    return FasterRCNN(backbone=backbone, rpn=rpn, roi_heads=roi_heads, config=cfg)
