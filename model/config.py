"""Detector configuration: frozen dataclasses, named presets and typed ``key=value`` overrides.

One config fully describes an architecture and its inference settings; it is stored beside the
weights in every checkpoint (``model.json``) so a checkpoint rebuilds itself with no code changes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

Sizes = tuple[tuple[int, ...], ...]
Ratios = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"  # resnet50 | resnet101 | mobilenet_v3_large | vgg16 | tiny
    fpn: bool = True
    norm: str = "frozen_bn"  # frozen_bn | bn | gn | none
    out_channels: int = 256  # FPN channels (ignored without FPN)
    # Levels returned to the heads, by stride; "pool" is P6 (stride-2 max-pool of the last FPN map).
    extra_pool: bool = True
    # Zero feature maps outside each image and drop anchors centred in the padding, so that a
    # batched image gets the same detections as alone (model/backbones/padding.py). Not torchvision's.
    pad_invariant: bool = False


@dataclass(frozen=True)
class AnchorConfig:
    sizes: Sizes = ((32,), (64,), (128,), (256,), (512,))  # one tuple per feature level
    aspect_ratios: Ratios = ((0.5, 1.0, 2.0),) * 5  # height / width


@dataclass(frozen=True)
class RPNConfig:
    objectness: str = "sigmoid"  # sigmoid (k logits) | softmax (2k logits)
    conv_channels: int = 0  # 0: same as the backbone's out channels
    pre_nms_top_n_train: int = 2000  # per level
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3
    # training targets
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    ignore_cross_boundary: bool = False  # the paper ignores anchors crossing the image border
    box_beta: float = 1.0 / 9  # smooth-L1 beta (the Huber delta=1/9 form)
    loss_weight_objectness: float = 1.0
    loss_weight_box: float = 1.0


@dataclass(frozen=True)
class RoIHeadsConfig:
    pooler: str = "align"  # align (multi-scale RoIAlign) | pool (RoIPool, single level)
    featmap_names: tuple[str, ...] = ("0", "1", "2", "3")
    output_size: int = 7
    sampling_ratio: int = 2
    aligned: bool = False
    representation_size: int = 1024
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float = 1e-2
    # training targets
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    bg_iou_lo: float = 0.0  # background in [bg_iou_lo, bg_iou_thresh); Fast R-CNN used 0.1
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    box_beta: float = 1.0 / 9
    loss_weight_classifier: float = 1.0
    loss_weight_box: float = 1.0


@dataclass(frozen=True)
class TransformConfig:
    min_size: int = 600
    max_size: int = 1000
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32
    pad_past_edge: bool = False  # >= 1 px of padding past every image (pad-invariant models)


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 91  # including background (class 0)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PRESETS = ("resnet50_fpn", "resnet101_fpn", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn",
           "vgg16_c4", "tiny")


def preset(name: str, num_classes: int = 91) -> ModelConfig:
    """Named architectures. R50/R101/MobileNet presets follow torchvision's detection models."""
    if name in ("resnet50_fpn", "resnet101_fpn"):
        return ModelConfig(num_classes=num_classes,
                           backbone=BackboneConfig(name=name.removesuffix("_fpn")))
    if name in ("mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn"):
        # torchvision: both returned maps are stride 32, so all RoIs pool from the first one.
        small = name == "mobilenet_v3_large_320_fpn"
        n_top = 150 if small else 1000
        return ModelConfig(
            num_classes=num_classes,
            backbone=BackboneConfig(name="mobilenet_v3_large"),
            anchors=AnchorConfig(sizes=((32, 64, 128, 256, 512),) * 3, aspect_ratios=((0.5, 1.0, 2.0),) * 3),
            rpn=RPNConfig(score_thresh=0.05, pre_nms_top_n_test=n_top, post_nms_top_n_test=n_top),
            roi_heads=RoIHeadsConfig(featmap_names=("0", "1")),
            transform=TransformConfig(min_size=320, max_size=640) if small else TransformConfig(),
        )
    if name == "vgg16_c4":
        # The paper: conv5_3 (stride 16), k=9 anchors, RoIPool 7x7, fc6/fc7 4096, 300 test proposals.
        return ModelConfig(
            num_classes=num_classes,
            backbone=BackboneConfig(name="vgg16", fpn=False, norm="none", extra_pool=False),
            anchors=AnchorConfig(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
            rpn=RPNConfig(pre_nms_top_n_train=12000, pre_nms_top_n_test=6000,
                          post_nms_top_n_train=2000, post_nms_top_n_test=300, min_size=16.0,
                          ignore_cross_boundary=True),
            roi_heads=RoIHeadsConfig(pooler="pool", featmap_names=("0",), representation_size=4096,
                                     bg_iou_lo=0.1, batch_size_per_image=128),
        )
    if name == "tiny":
        # A small net for tests and the demo: trains from scratch in minutes on 2 cores. BatchNorm,
        # not GroupNorm (GN statistics span the padded batch), and pad-invariant: detections do not
        # depend on what an image is batched with.
        return ModelConfig(
            num_classes=num_classes,
            backbone=BackboneConfig(name="tiny", norm="bn", out_channels=64, pad_invariant=True),
            anchors=AnchorConfig(sizes=((16,), (32,), (64,), (128,), (256,))),
            rpn=RPNConfig(pre_nms_top_n_train=600, pre_nms_top_n_test=300,
                          post_nms_top_n_train=300, post_nms_top_n_test=100),
            roi_heads=RoIHeadsConfig(representation_size=256, batch_size_per_image=128),
            transform=TransformConfig(min_size=320, max_size=512, pad_past_edge=True),
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply ``section.key=value`` strings to a (nested) frozen dataclass, with type checking.

    >>> apply_overrides(preset("tiny"), ["rpn.nms_thresh=0.6"]).rpn.nms_thresh
    0.6
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), raw.strip(), key)
    return cfg


def _set_path(obj: Any, path: list[str], raw: str, full_key: str) -> Any:
    names = {f.name: f for f in fields(obj)}
    if path[0] not in names:
        raise ValueError(f"unknown config key {full_key!r}: {type(obj).__name__} has {', '.join(names)}")
    f = names[path[0]]
    current = getattr(obj, f.name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r}: {path[0]} is not a section")
        return replace(obj, **{f.name: _set_path(current, path[1:], raw, full_key)})
    hint = typing.get_type_hints(type(obj))[f.name]
    return replace(obj, **{f.name: _parse(raw, hint, full_key)})


def _parse(raw: str, hint: Any, key: str) -> Any:
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
        return _coerce(ast.literal_eval(raw), hint)  # literals only: never evaluates code
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ValueError(f"config key {key!r}: cannot read {raw!r} as {hint}") from exc


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if hint is float:
        return float(value)
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not an integer")
        return int(value)
    return value


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue  # older checkpoints: new fields take their defaults
        hint = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_dict(hint, value)
        else:
            kwargs[f.name] = _coerce(value, hint)
    return cls(**kwargs)
