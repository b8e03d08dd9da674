"""POST /detect's response body, encoded once with orjson.

FastAPI would validate the DetectResponse model again and encode it through jsonable_encoder;
for a response of plain numbers that is most of the JSON time. The shape is DetectResponse's
(server/schemas.py, still the documented response_model): tests/server/test_batch_invariance.py
validates real responses against it.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def detect_body(engine: Any, answers: list[Any], t_start: float) -> bytes:
    names = engine.class_names
    n_names = len(names)
    results = []
    for a in answers:
        dets = [{"box": [round(v, 2) for v in box], "score": round(s, 4),
                 "label": names[lab] if 0 <= lab < n_names else str(lab), "label_id": lab}
                for box, s, lab in zip(a.boxes.tolist(), a.scores.tolist(), a.labels.tolist(), strict=True)]
        results.append({"image": a.name, "width": int(a.width), "height": int(a.height), "detections": dets})
    ms = 1000.0
    timing = {
        "decode": round(sum(a.decode_s for a in answers) * ms, 3),
        "preprocess": round(sum(a.preprocess_s for a in answers) * ms, 3),
        "queue": round(max(a.queue_s for a in answers) * ms, 3),
        "inference": round(max(a.backend_s for a in answers) * ms, 3),
        "postprocess": round(max(a.postprocess_s for a in answers) * ms, 3),
        "total": round((time.perf_counter() - t_start) * ms, 3),
    }
    return orjson.dumps({"results": results, "model": {"name": engine.model_name, "backend": engine.backend_name},
                         "timing_ms": timing})
