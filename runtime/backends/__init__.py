"""Inference backends. Each is a callable
``backend(images: Tensor[B, 3, H, W] float32, image_sizes: Tensor[B, 2] int64) -> RawDetections``
with ``name``, ``config`` (the model's ModelConfig or None) and ``class_names``."""
