"""Request and response bodies (pydantic; they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_DETECTIONS = 1000  # most detections one image may ask for (max_detections)


class Detection(BaseModel):
    box: list[float] = Field(..., min_length=4, max_length=4,
                             description="x1, y1, x2, y2 in pixels of the original image (EXIF-oriented)")
    score: float = Field(..., ge=0.0, le=1.0)
    label: str
    label_id: int = Field(..., ge=1, description="class index; 0 is background and never returned")


class ImageResult(BaseModel):
    image: str = Field(..., description="file name of the upload, or images[i] for JSON input")
    width: int
    height: int
    detections: list[Detection]


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    backend: str
    classes: list[str] = Field(..., description="index = label_id; 0 = __background__")
    input: dict[str, object] = Field(default_factory=dict,
                                     description="min_size, max_size, image_mean, image_std, size_divisible")
    max_batch_size: int
    score_threshold: float = Field(..., description="default when a request gives none")
    max_detections: int
    version: str = Field("1", description="as the Open Inference Protocol routes (/v2/models/...) report it")
    precision: str = Field("fp32", description="what the graph computes in: fp32, fp16 or int8")
    sample: str | None = Field(None, description="relative URL of a sample image this model was made for")


class ModelSummary(BaseModel):
    name: str
    backend: str


class Timing(BaseModel):
    """Milliseconds. Per-image stages are summed over the images of the request."""

    decode: float
    preprocess: float
    queue: float = Field(..., description="waiting for a batch, longest over the request's images")
    inference: float = Field(..., description="backend time of the batches the images ran in")
    postprocess: float
    total: float


class DetectResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    results: list[ImageResult]
    model: ModelSummary
    timing_ms: Timing


class DetectJSON(BaseModel):
    images: list[str] = Field(..., min_length=1, description="base64 image bytes (data: URLs accepted)")
    names: list[str] | None = Field(None, description="optional names echoed in results[].image")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=MAX_DETECTIONS)
    classes: list[str | int] | None = Field(None, description="names or label ids to keep")


class ErrorBody(BaseModel):
    error: str = Field(..., description="machine-readable kind, e.g. unsupported_image")
    detail: str
    image: str | None = Field(None, description="the file the error is about, if any")


class Health(BaseModel):
    status: str
