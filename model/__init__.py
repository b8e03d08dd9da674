"""frcnn.model: Faster R-CNN in plain PyTorch. Imports nothing else of the project.

Background is class 0 everywhere; boxes are xyxy in absolute pixels.
"""

from model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from model.config import ModelConfig, apply_overrides, preset
from model.detector import FasterRCNN, build_model
from model.postprocess import Detections, RawDetections, postprocess
from model.transform import ImageBatch, preprocess

__all__ = [
    "CheckpointMeta", "Detections", "FasterRCNN", "ImageBatch", "ModelConfig", "RawDetections", "apply_overrides",
    "build_model", "load_checkpoint", "postprocess", "preprocess", "preset", "read_meta", "save_checkpoint",
]
