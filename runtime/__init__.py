"""frcnn.runtime: one inference pipeline over the torch, onnxruntime and TensorRT backends."""

from model.postprocess import Detections
from runtime.pipeline import Pipeline, PostOptions, PreparedImage

__all__ = ["Detections", "Pipeline", "PostOptions", "PreparedImage"]
