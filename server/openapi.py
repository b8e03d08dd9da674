"""The OpenAPI schema at /openapi.json, made to tell the truth about this server:

- POST /detect's query parameters (score_threshold, max_detections, classes), its multipart parts
  (`images` required, 1..max_images_per_request files) and JSON body, with the loaded model's
  class names and ids as the only accepted `classes`;
- API-key security only when the server has an api_key (FastAPI lists it for every APIKeyHeader
  dependency, configured or not).

What JSON Schema cannot state is said in descriptions: the bytes must decode as an image, `names`
has one entry per image, the whole body is at most max_upload_bytes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from runtime.images import SUPPORTED_FORMATS
from server.schemas import MAX_DETECTIONS, DetectJSON, ErrorBody

_SCORE = {"type": "number", "minimum": 0.0, "maximum": 1.0,
          "description": "keep detections scoring at least this (default: the server's score_threshold)"}
_TOP_K = {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS,
          "description": "most detections per image (default: the server's max_detections)"}
_CLASSES_WHY = "classes to keep, by name or label id; repeat the field or separate them with commas"


def class_ref(class_names: list[str] | None, *, json: bool) -> dict[str, Any]:
    """Schema of one `classes` entry: a class name, or a label id (text; a JSON integer too)."""
    if not class_names or len(class_names) < 2:
        text: dict[str, Any] = {"type": "string", "minLength": 1}
        return {"anyOf": [text, {"type": "integer", "minimum": 1}]} if json else text
    ids = range(1, len(class_names))
    text = {"type": "string", "enum": list(dict.fromkeys([*class_names[1:], *map(str, ids)]))}
    if not json:
        return text
    return {"anyOf": [text, {"type": "integer", "minimum": 1, "maximum": len(class_names) - 1}]}


def detect_operation(settings: Any, class_names: list[str] | None = None) -> dict[str, Any]:
    """openapi_extra for POST /detect: its query parameters and request bodies."""
    n = settings.max_images_per_request
    limits = (f"At most {n} images and {settings.max_upload_bytes} bytes per request; each must decode as an "
              f"image ({', '.join(SUPPORTED_FORMATS)}) of at most {settings.max_pixels} pixels.")
    multipart = {
        "type": "object",
        "required": ["images"],
        "properties": {
            "images": {"type": "array", "minItems": 1, "maxItems": n,
                       "items": {"type": "string", "format": "binary"},
                       "description": "image files, one part each (a single file may also come as `image`)"},
            "score_threshold": _SCORE,
            "max_detections": _TOP_K,
            "classes": {"type": "array", "items": class_ref(class_names, json=False), "description": _CLASSES_WHY},
        },
    }
    body = copy.deepcopy(DetectJSON.model_json_schema())
    props = body["properties"]
    props["images"]["maxItems"] = n
    props["images"]["items"] = {"type": "string", "contentEncoding": "base64"}
    props["names"]["description"] = "one name per image, echoed in results[].image"
    props["classes"] = {"anyOf": [{"type": "array", "items": class_ref(class_names, json=True)}, {"type": "null"}],
                        "default": None, "description": "classes to keep, by name or label id"}
    query = [
        {"name": "score_threshold", "in": "query", "required": False, "schema": _SCORE},
        {"name": "max_detections", "in": "query", "required": False, "schema": _TOP_K},
        {"name": "classes", "in": "query", "required": False, "style": "form", "explode": True,
         "schema": {"type": "array", "items": class_ref(class_names, json=False)}, "description": _CLASSES_WHY},
    ]
    for p in query:
        p["description"] = p.get("description", p["schema"].get("description", "")) + "; the body's field wins"
    return {
        "parameters": query,
        "requestBody": {
            "required": True,
            "description": limits,
            "content": {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": body}},
        },
    }


def install_openapi(app: FastAPI, settings: Any) -> None:
    """Replace app.openapi: the generated schema, /detect filled in once the model is loaded (its
    class names), security removed when no api_key is configured."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        engine = getattr(app.state, "engine", None)
        detect = schema.get("paths", {}).get("/detect", {}).get("post")
        if detect is not None and engine is not None:
            detect.update(detect_operation(settings, list(engine.class_names)))
        _validation_errors_as_error_body(schema)
        if not settings.api_key:
            _drop_security(schema)
        if engine is not None:  # before the model loads the class names are unknown: do not cache
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_security(schema: dict[str, Any]) -> None:
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict):
                op.pop("security", None)
                responses = op.get("responses", {})
                responses.pop("401", None)
    components = schema.get("components", {})
    components.pop("securitySchemes", None)


def _validation_errors_as_error_body(schema: dict[str, Any]) -> None:
    """FastAPI documents its own 422 body (HTTPValidationError); server/errors.py answers
    request-validation errors with ErrorBody, like every other error."""
    default = "#/components/schemas/HTTPValidationError"
    for item in schema.get("paths", {}).values():
        for op in item.values():
            r422 = op.get("responses", {}).get("422") if isinstance(op, dict) else None
            content = (r422 or {}).get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref") == default:
                content["schema"] = {"$ref": "#/components/schemas/ErrorBody"}
                schemas = schema.setdefault("components", {}).setdefault("schemas", {})
                schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
    schemas = schema.get("components", {}).get("schemas", {})
    if default not in json.dumps(schema.get("paths", {})):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
