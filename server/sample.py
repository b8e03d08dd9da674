"""GET /sample.png: an image the loaded model was made for, so a newcomer sees correct boxes in one
click. For a model of the synthetic-shapes classes (the bundled demo) it is a held-out image of the
project's own generator (runtime/shapes.py; val split, never trained on); other models have none.

    GET /sample.png?index=i     PNG; i cycles through SAMPLES
"""

from __future__ import annotations

import io

from fastapi import APIRouter, Query, Request, Response
from PIL import Image

from runtime import shapes
from server.errors import ApiError
from server.jobs import engine_of

# Val-split images (seed 0) with 3-4 objects of varied shapes that the demo checkpoint finds, each
# with the right label, IoU > 0.8 and score > 0.95 (tests/server/test_server_page.py checks it).
SAMPLES = (59, 7, 9, 44)
SAMPLE_PATH = "sample.png"

router = APIRouter()


def has_sample(class_names: list[str]) -> bool:
    return tuple(class_names) == shapes.CLASS_NAMES


def sample_png(i: int) -> bytes:
    image, _ = shapes.sample(0, "val", SAMPLES[i % len(SAMPLES)])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@router.get("/" + SAMPLE_PATH, response_class=Response, summary="A sample image for the loaded model",
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no sample for this model"}})
async def sample(request: Request, index: int = Query(0, ge=0, le=1_000_000)) -> Response:
    engine = engine_of(request.app.state)
    if not has_sample(engine.class_names):
        raise ApiError(404, "no_sample", "no sample image for this model's classes: upload a photo instead")
    return Response(sample_png(index), media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})
