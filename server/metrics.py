"""Prometheus metrics, one registry per app instance (several apps in one process do not collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from server.batcher import BatchStats

# The `method` label's values: any other method string a client sends is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_SHAPES = 32  # distinct padded-shape label values before "other"
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("frcnn_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("frcnn_request_latency_seconds", "HTTP request latency",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("frcnn_images", "images answered by /detect, by outcome",
                              ["outcome"], registry=r)
        self.batch_size = Histogram("frcnn_batch_size", "images per backend call",
                                    buckets=_batch_buckets(max_batch_size), registry=r)
        self.inference = Histogram("frcnn_inference_seconds", "one batched call: collate, backend, postprocess",
                                   buckets=_STAGE_BUCKETS, registry=r)
        self.backend = Histogram("frcnn_backend_seconds", "backend call alone, per batch",
                                 buckets=_STAGE_BUCKETS, registry=r)
        self.preprocess = Histogram("frcnn_preprocess_seconds", "decode + resize + normalize, per image",
                                    buckets=_STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("frcnn_queue_depth", "images waiting for a batch", registry=r)
        self.rejected = Counter("frcnn_rejected", "images refused because the queue was full", registry=r)
        self.ready = Gauge("frcnn_ready", "1 once the model is loaded and warmed up", registry=r)
        self.max_batch_size = Gauge("frcnn_max_batch_size", "largest batch the server forms (max_batch_size, "
                                    "or less where batch_autotune found a larger batch does not pay)", registry=r)
        # Batching by padded shape: images batch only with images of the same padded size, so
        # mean batch per shape (images / batches) shows whether batching happens for each.
        self.shape_batches = Counter("frcnn_shape_batches", "backend calls by padded input shape (HxW)",
                                     ["shape"], registry=r)
        self.shape_images = Counter("frcnn_shape_images", "images in backend calls by padded input shape (HxW)",
                                    ["shape"], registry=r)
        self._shapes: set[str] = set()
        self.cancelled = Counter("frcnn_cancelled", "images whose request was answered (504, 503, client gone) "
                                 "before their decode or their backend call started, by the stage skipped",
                                 ["stage"], registry=r)
        self.refused_pixels = Counter("frcnn_refused_pixels", "requests refused (413) from their image headers: "
                                      "more decoded pixels than max_request_pixels", registry=r)
        self.decoding = Gauge("frcnn_decoding", "images being decoded now, by lane", ["lane"], registry=r)
        self.decode_pixels = Gauge("frcnn_decode_pixels_in_flight", "decoded pixels of the images being "
                                   "decoded now (bounded by max_decode_pixels)", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.inference.observe(stats.handle_s)
        shape = self.shape_label(stats.key)
        self.shape_batches.labels(shape).inc()
        self.shape_images.labels(shape).inc(stats.size)

    def watch(self, batcher: Any) -> None:
        """Gauges read from a running MicroBatcher at scrape time."""
        self.queue_depth.set_function(lambda: batcher.depth)
        for lane in ("small", "large"):
            self.decoding.labels(lane).set_function(lambda lane=lane: batcher.lanes.running(lane))
        self.decode_pixels.set_function(lambda: batcher.lanes.in_flight)

    def shape_label(self, key: object) -> str:
        """(H, W) -> "HxW"; None (mixed-size batches) -> "mixed". The first MAX_SHAPES shapes get
        their own label, later ones share "other": the series count stays bounded."""
        if key is None:
            return "mixed"
        label = "x".join(str(int(v)) for v in key)  # type: ignore[union-attr]
        if label not in self._shapes:
            if len(self._shapes) >= MAX_SHAPES:
                return "other"
            self._shapes.add(label)
        return label

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Integer buckets 1, 2, 3, 4, 6, 8, 12, 16... up to max_batch_size: every small size exact."""
    edges, b = [], 1
    while b < max_batch_size:
        edges.append(b)
        b = b + 1 if b < 4 else b + b // 2
    edges.append(max_batch_size)
    return tuple(float(e) for e in sorted(set(edges)))
