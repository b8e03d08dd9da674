"""Every server setting, in one validated place.

Sources, highest priority first: keyword arguments (the CLI passes its options this way),
environment variables with the prefix FRCNN_ (FRCNN_MAX_BATCH_SIZE=16), a `.env` file, defaults.
List settings take JSON or a comma-separated string: FRCNN_CORS_ORIGINS=https://a.example,https://b.example
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "torch", "onnxruntime", "tensorrt"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]

# Bundled demo model, served when no model is given (relative to the repository root).
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny-shapes"


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRCNN_", env_file=".env", extra="ignore",
                                      validate_default=True, protected_namespaces=())

    # model and backend
    model: Path | None = Field(None, description="checkpoint dir, .onnx or .engine; None = bundled demo")
    backend: Backend = "auto"
    threads: int | None = Field(None, ge=1, validation_alias=AliasChoices(
                                    "threads", "frcnn_threads", "intra_op_threads", "frcnn_intra_op_threads"),
                                description="backend intra-op threads; None = library default "
                                            "(FRCNN_INTRA_OP_THREADS is the deprecated spelling)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$",
                        description="torch backend: where the checkpoint runs (cpu, cuda, cuda:N)")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="onnxruntime execution providers in order of preference "
        "(cpu, cuda, tensorrt or onnxruntime's full names; comma-separated in FRCNN_PROVIDERS); "
        "empty = the best this onnxruntime build offers (TensorRT, CUDA, then CPU)")
    winograd: bool = Field(True, description="onnxruntime on the CPU provider: compute the large 3x3 "
                           "convolutions by Winograd F(4x4, 3x3) (fp32 arithmetic, about 1e-5 relative from the "
                           "direct convolution; false = direct, as the file says)")

    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, repr=False, description="if set, X-API-Key must match")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: LogLevel = "info"

    # batching
    max_batch_size: int = Field(8, ge=1, le=256)
    max_delay_ms: float = Field(10.0, ge=0, le=10_000)
    batch_autotune: bool = Field(True, description="at start, time the backend at batch 1, 2, 4 ... "
                                 "max_batch_size and batch only up to the largest size that takes >= 10% "
                                 "less time per image (on a CPU a compute-bound model gains nothing: 1)")
    queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    workers: int = Field(default_factory=_default_workers, ge=1, description="decode/preprocess threads")
    batch_mixed_sizes: bool = Field(False, description="let images of different padded sizes share a batch "
                                    "(padded to the largest): more throughput under mixed sizes, but an "
                                    "image's answer then depends on what it is batched with")
    wait_when_idle: bool = Field(False, description="wait max_delay_ms for a batch to fill even when the "
                                 "server is idle (by default an idle server runs a lone image at once)")
    decode_bands: bool = Field(True, description="a baseline JPEG that arrives while nothing else is in "
                               "flight is decoded by two threads (runtime/_jpegbands: the same pixels, about "
                               "20% less decode time in the server on 2 idle cores); off where other busy "
                               "processes share the cores")
    inference_threads: int = Field(1, ge=1, le=16, description="backend calls that may run at once "
                                   "(different padded sizes); 1 lets each batch own every intra-op thread")

    # decode budget (checked from image headers before any pixel is decoded)
    max_request_pixels: int | None = Field(None, ge=1, description="decoded pixels per request, else 413; "
                                           "None = 4 x max_pixels")
    large_decode_pixels: int = Field(4_000_000, ge=1, description="images above this many pixels decode in "
                                     "their own lane (one thread), so small images never wait behind them")
    max_decode_pixels: int | None = Field(None, ge=1, description="decoded pixels in flight across the server "
                                          "(memory); None = max_pixels + workers x large_decode_pixels")

    # input limits
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(16, ge=1)

    # connections (server/guard.py): what a slow or greedy client may hold
    body_timeout_s: float = Field(30.0, gt=0, description="whole request body within this, else 408 and close")
    header_timeout_s: float = Field(10.0, gt=0, description="request headers within this, else 408 and close")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line + headers, else 431")
    max_connections: int = Field(512, ge=1, description="open connections; past it a 503 and close")

    # response defaults (a request may override them)
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)

    @field_validator("cors_origins", "providers", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("model", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        # FRCNN_MODEL= (set but empty, as templated deploy files write it) means "not given"
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @property
    def request_pixel_budget(self) -> int:
        return self.max_request_pixels or 4 * self.max_pixels

    @property
    def decode_pixel_budget(self) -> int:
        return self.max_decode_pixels or self.max_pixels + self.workers * self.large_decode_pixels

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else DEMO_CHECKPOINT
