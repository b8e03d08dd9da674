"""What the onnxruntime and TensorRT backends share: facts read from the graph's metadata."""

from __future__ import annotations

from model.config import ModelConfig


class GraphMetadataMixin:
    """class_names, input_settings and config from ``self.metadata`` (runtime.contract.GraphMetadata)
    and ``self.path``, for backends that run an exported graph."""

    @property
    def class_names(self) -> list[str]:
        return self.metadata.class_names

    @property
    def precision(self) -> str:
        return self.metadata.precision

    @property
    def input_settings(self) -> dict:
        return self.metadata.input_settings

    @property
    def config(self) -> ModelConfig:
        """The checkpoint's ModelConfig, stored in the graph metadata (transform and postprocess
        settings for the shared pipeline)."""
        if self.metadata.config is None:
            raise ValueError(f"{self.path}: graph metadata has no model config")
        return ModelConfig.from_dict(self.metadata.config)
