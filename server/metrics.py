"""Prometheus metrics, one registry per app instance (several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from server.batcher import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.inference.observe(stats.handle_s)

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
