"""onnxruntime backend: runs an exported .onnx graph (runtime/contract.py) behind the Backend protocol.

    backend = OnnxRuntimeBackend("model.onnx", intra_op_threads=2)
    raw = backend(images: Tensor[B, 3, H, W] float32, image_sizes: Tensor[B, 2] int64) -> RawDetections

Raw graphs return RawDetections as the torch model does. --with-nms graphs (boxes [B, K, 4], scores,
labels, num_detections) are turned back into RawDetections with one row per kept detection whose
scores are one-hot at its label, so the shared postprocess reproduces them: re-running class-wise NMS
on an NMS output at the same threshold keeps everything, and the score filter drops the zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from runtime.backends.graph_metadata import GraphMetadataMixin
from runtime.contract import INPUT_NAMES, GraphMetadata, check_output_names

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# tried in this order when providers is None; onnxruntime-gpu offers the first two
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError("the onnxruntime backend needs `pip install onnxruntime` (or onnxruntime-gpu)") from e
    return onnxruntime


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Execution provider names: aliases (cpu, cuda, tensorrt) expanded; None = best available."""
    ort = _import_ort()
    available = ort.get_available_providers()
    if providers is None:
        return [p for p in _AUTO_ORDER if p in available]
    names = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    missing = [p for p in names if p not in available]
    if missing:
        raise ValueError(f"execution providers {missing} not available here (available: {available})")
    return names


_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeBackend(GraphMetadataMixin):
    """One onnxruntime InferenceSession over a frcnn .onnx graph; call it from one thread at a time
    for predictable latency (onnxruntime itself is thread-safe)."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        profile_prefix: str | None = None,
        winograd: bool | None = None,
    ):
        """winograd: compute the graph's large 3x3 convolutions by Winograd F(4x4, 3x3)
        (runtime/backends/winograd.py), rewritten in memory as the session loads; None = where it pays,
        when the CPU execution provider runs the graph. The file is not changed."""
        ort = _import_ort()
        opts = ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        # Worker threads spin between the operators of a run, not after it: a server decodes the next
        # request's image on these cores while the model is idle.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        if graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        self.path = Path(path)
        self.providers = resolve_providers(providers)
        if winograd is None:
            winograd = self.providers[:1] == ["CPUExecutionProvider"]
        self.winograd_convs = 0  # convolutions the session computes by Winograd's F(4x4, 3x3)
        source: str | bytes = str(self.path)
        if winograd:
            source, self.winograd_convs = _winograd_bytes(self.path)
        self.session = ort.InferenceSession(source, opts, providers=self.providers)
        del source  # the serialized graph (300 MB for R50-FPN): the session has its own copy
        self.metadata = GraphMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        self.output_names = [o.name for o in self.session.get_outputs()]
        check_output_names(self.output_names, with_nms=self.metadata.with_nms)
        got_inputs = tuple(i.name for i in self.session.get_inputs())
        if got_inputs != INPUT_NAMES:
            raise ValueError(f"graph inputs {got_inputs} != contract {INPUT_NAMES}")

    def run(self, images: Tensor, image_sizes: Tensor) -> list[np.ndarray]:
        """The graph's outputs as numpy arrays, in contract order."""
        feeds = {
            "images": np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32),
            "image_sizes": np.ascontiguousarray(image_sizes.detach().cpu().numpy(), dtype=np.int64),
        }
        return self.session.run(self.output_names, feeds)

    def __call__(self, images: Tensor, image_sizes: Tensor):
        outs = self.run(images, image_sizes)
        if self.metadata.with_nms:
            return nms_outputs_to_raw(*(torch.from_numpy(o) for o in outs),
                                      num_classes=len(self.metadata.class_names))
        from model.postprocess import RawDetections

        batch_idx, scores, boxes = (torch.from_numpy(o) for o in outs)
        return RawDetections(batch_idx=batch_idx, scores=scores, boxes=boxes)

    def end_profiling(self) -> str:
        """Stop profiling (profile_prefix was given); returns the JSON trace's path."""
        return self.session.end_profiling()


def _winograd_bytes(path: Path) -> tuple[str | bytes, int]:
    """The graph at `path` with its eligible convolutions rewritten (serialized), or the path itself
    when none is eligible or the result would pass protobuf's 2 GB limit."""
    import onnx

    from runtime.backends.winograd import winograd_convs

    try:
        model = onnx.load_model(str(path))
    except Exception:  # not a readable graph: onnxruntime's own error, raised next, says why
        return str(path), 0
    count = winograd_convs(model)
    if not count or model.ByteSize() >= 2**31 - 2**24:
        return str(path), 0
    return model.SerializeToString(), count


def nms_outputs_to_raw(boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor, *,
                       num_classes: int):
    """Padded NMS outputs (boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B]) ->
    RawDetections with R = sum(num_detections) rows: scores [R, C] one-hot at the label,
    boxes [R, C, 4] the detection's box in every class column."""
    from model.postprocess import RawDetections

    b, k = scores.shape
    valid = torch.arange(k)[None, :] < num_detections[:, None]  # (B, K)
    batch_idx = torch.arange(b)[:, None].expand(b, k)[valid]  # (R,)
    det_scores, det_labels, det_boxes = scores[valid], labels[valid], boxes[valid]  # (R,), (R,), (R, 4)
    r = det_scores.shape[0]
    raw_scores = torch.zeros((r, num_classes), dtype=det_scores.dtype)
    raw_scores[torch.arange(r), det_labels] = det_scores
    raw_boxes = det_boxes[:, None, :].expand(r, num_classes, 4).contiguous()
    return RawDetections(batch_idx=batch_idx, scores=raw_scores, boxes=raw_boxes)
