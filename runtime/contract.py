"""The inference graph contract, declared once.

Every exported artefact (ONNX graph, TensorRT engine sidecar, Triton config) and every backend that
runs one reads its input/output names, shapes and dtypes from here.

Shape shorthand: B images in a batch, H, W padded batch size (multiple of size_divisible),
R RoIs over the whole batch, C classes including background (class 0), K detections per image
(--with-nms graphs only). Boxes are xyxy in pixels of the resized (not padded) image.

Two graph flavours:
    raw      images, image_sizes -> batch_idx [R], scores [R, C], boxes [R, C, 4]
             (model.postprocess runs outside the graph; R is data dependent)
    nms      images, image_sizes -> boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B]
             (class-wise NMS, score filter and top-K in the graph; rows >= num_detections are padding)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONTRACT_VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dims are ints (fixed) or names (dynamic)."""

    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    dims: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("images", "float32", ("B", 3, "H", "W")),  # normalized, zero padded
    TensorSpec("image_sizes", "int64", ("B", 2)),  # (h, w) of each resized image before padding
)

RAW_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("batch_idx", "int64", ("R",)),
    TensorSpec("scores", "float32", ("R", "C")),  # softmax over classes, column 0 = background
    TensorSpec("boxes", "float32", ("R", "C", 4)),  # decoded per class, clipped to the image
)


def nms_outputs(max_detections: int) -> tuple[TensorSpec, ...]:
    """Outputs of a --with-nms graph, padded to K = max_detections rows per image."""
    k = int(max_detections)
    return (
        TensorSpec("boxes", "float32", ("B", k, 4)),
        TensorSpec("scores", "float32", ("B", k)),
        TensorSpec("labels", "int64", ("B", k)),  # 1..C-1; 0 in padding rows
        TensorSpec("num_detections", "int64", ("B",)),
    )


def output_specs(*, with_nms: bool, max_detections: int = 100) -> tuple[TensorSpec, ...]:
    return nms_outputs(max_detections) if with_nms else RAW_OUTPUTS


INPUT_NAMES: tuple[str, ...] = tuple(s.name for s in INPUTS)
RAW_OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in RAW_OUTPUTS)
NMS_OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in nms_outputs(1))

# Metadata keys (ONNX metadata_props, TensorRT sidecar JSON); values are JSON strings.
META_VERSION = "frcnn.contract_version"
META_FLAVOUR = "frcnn.outputs"  # "raw" | "nms"
META_CLASS_NAMES = "frcnn.class_names"  # list[str], index = label id, 0 = "__background__"
META_INPUT_SETTINGS = "frcnn.input_settings"  # min_size, max_size, image_mean, image_std, size_divisible
META_POSTPROCESS = "frcnn.postprocess"  # score_thresh, nms_thresh, detections_per_img, min_size
META_MODEL_NAME = "frcnn.model_name"
META_CONFIG = "frcnn.config"  # the model config as a dict (provenance)
META_SIGNATURE = "frcnn.signature"  # inputs/outputs as TensorSpec JSON
META_PRECISION = "frcnn.precision"  # "fp32" | "fp16" | "int8": decided in the graph, not by a runtime
META_SOURCE_DIGEST = "frcnn.source_digest"  # hash of the checkpoint + export code the graph came from
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class GraphMetadata:
    """What a backend needs to know about a graph besides its weights."""

    flavour: str  # "raw" | "nms"
    class_names: list[str]
    input_settings: dict[str, Any]
    postprocess: dict[str, Any]
    model_name: str = ""
    config: dict[str, Any] | None = None
    max_detections: int | None = None  # K, nms flavour only
    precision: str = "fp32"
    source_digest: str = ""

    @property
    def with_nms(self) -> bool:
        return self.flavour == "nms"

    def signature(self) -> dict[str, Any]:
        outs = output_specs(with_nms=self.with_nms, max_detections=self.max_detections or 0)
        return {"inputs": [s.to_json() for s in INPUTS], "outputs": [s.to_json() for s in outs]}

    def to_props(self) -> dict[str, str]:
        """Flat str -> JSON str mapping, as ONNX metadata_props stores it."""
        props = {
            META_VERSION: json.dumps(CONTRACT_VERSION),
            META_FLAVOUR: json.dumps(self.flavour),
            META_CLASS_NAMES: json.dumps(list(self.class_names)),
            META_INPUT_SETTINGS: json.dumps(self.input_settings),
            META_POSTPROCESS: json.dumps(self.postprocess),
            META_MODEL_NAME: json.dumps(self.model_name),
            META_SIGNATURE: json.dumps(self.signature()),
            META_PRECISION: json.dumps(self.precision),
            META_SOURCE_DIGEST: json.dumps(self.source_digest),
        }
        if self.config is not None:
            props[META_CONFIG] = json.dumps(self.config)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> GraphMetadata:
        missing = [k for k in (META_FLAVOUR, META_CLASS_NAMES, META_INPUT_SETTINGS) if k not in props]
        if missing:
            raise ValueError(f"not an frcnn graph: metadata keys {missing} missing")
        version = json.loads(props.get(META_VERSION, '"0"'))
        if version != CONTRACT_VERSION:
            raise ValueError(f"graph contract version {version!r}, this code reads {CONTRACT_VERSION!r}")
        flavour = json.loads(props[META_FLAVOUR])
        max_det = None
        if flavour == "nms":
            sig = json.loads(props.get(META_SIGNATURE, "{}"))
            dims = {o["name"]: o["dims"] for o in sig.get("outputs", [])}
            max_det = int(dims["scores"][1]) if "scores" in dims else None
        return cls(
            flavour=flavour,
            class_names=json.loads(props[META_CLASS_NAMES]),
            input_settings=json.loads(props[META_INPUT_SETTINGS]),
            postprocess=json.loads(props.get(META_POSTPROCESS, "{}")),
            model_name=json.loads(props.get(META_MODEL_NAME, '""')),
            config=json.loads(props[META_CONFIG]) if META_CONFIG in props else None,
            max_detections=max_det,
            precision=json.loads(props.get(META_PRECISION, '"fp32"')),
            source_digest=json.loads(props.get(META_SOURCE_DIGEST, '""')),
        )


def check_output_names(names: Sequence[str], *, with_nms: bool) -> None:
    """Raise if a graph's outputs are not the declared ones, in order."""
    want = NMS_OUTPUT_NAMES if with_nms else RAW_OUTPUT_NAMES
    if tuple(names) != want:
        raise ValueError(f"graph outputs {list(names)} != contract {list(want)}")
