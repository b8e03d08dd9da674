"""frcnn.runtime: one inference pipeline over the torch, onnxruntime and TensorRT backends."""

from model.postprocess import Detections
from runtime.backends import BACKENDS, resolve_backend
from runtime.pipeline import Pipeline, PostOptions, PreparedImage, same_size_batches

__all__ = ["BACKENDS", "Detections", "Pipeline", "PostOptions", "PreparedImage", "resolve_backend",
           "same_size_batches"]
