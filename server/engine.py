"""The server's view of a runtime.Pipeline: per-image prepare, batched handle, model info.

    cost(Job) -> int              event loop: decoded pixels, from the image header only
    prepare(Job) -> Prepared      decode lanes: decode (runtime.images) + resize/normalize
    batch_key(Prepared) -> (H, W) the padded size: the batcher batches equal keys only
    handle(list[Prepared]) -> list[Answer | Exception]
                                  inference thread: collate, one backend call, class-wise NMS
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.images import load_image, probe_image

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Job:
    """One image of one request, as it enters the batcher."""

    name: str
    data: bytes
    score_threshold: float
    max_detections: int
    classes: frozenset[int] | None = None


@dataclass
class Prepared:
    job: Job
    width: int  # original, after EXIF orientation
    height: int
    item: Any  # pipe.prepare(...) result, or the decoded array when the pipeline has no prepare
    decode_s: float
    preprocess_s: float
    ready_at: float = field(default_factory=time.perf_counter)


@dataclass
class Answer:
    name: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xyxy, original pixels
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int64, >= 1
    decode_s: float
    preprocess_s: float
    queue_s: float
    backend_s: float  # the batch's backend call
    postprocess_s: float  # the batch's postprocess, shared by its images
    batch_size: int


class Engine:
    """Adapter between the batcher and a runtime.Pipeline (duck-typed: anything with the
    methods of docs/CONTRACTS.md "runtime")."""

    def __init__(self, pipe: Any, *, max_pixels: int, mixed_batches: bool = False,
                 decode_bands: bool = False) -> None:
        """mixed_batches: let images of different padded sizes share a batch (padded to the
        largest). Faster under mixed traffic, but an image's answer then depends on its batch
        (torchvision architectures change detections near the padding).
        decode_bands: an image prepared alone (nothing else in flight) is decoded by two threads
        where it is a baseline JPEG (runtime.jpeg_bands; the same pixels)."""
        self.pipe = pipe
        self.max_pixels = max_pixels
        self.mixed_batches = mixed_batches
        self.decode_bands = decode_bands
        self.on_backend: Any = None  # callable(seconds) for metrics

    # -- model facts ---------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.pipe.class_names)

    @property
    def model_name(self) -> str:
        return str(getattr(self.pipe, "model_name", "model"))

    @property
    def backend_name(self) -> str:
        return str(getattr(self.pipe, "backend_name", "unknown"))

    @property
    def input_settings(self) -> dict[str, Any]:
        return dict(getattr(self.pipe, "input_settings", {}) or {})

    def class_ids(self, wanted: list[str | int]) -> frozenset[int]:
        """Names or ids -> label ids. Raises KeyError naming the unknown entry."""
        names = self.class_names
        index = {n: i for i, n in enumerate(names)}
        ids = set()
        for w in wanted:
            # ASCII digits only: "²".isdigit() is true but int("²") raises; 9 digits bound int()'s cost
            digits = w.strip() if isinstance(w, str) else ""
            if isinstance(w, int) or (digits.isascii() and digits.isdigit() and len(digits) <= 9):
                i = int(w)
                if not 1 <= i < len(names):
                    raise KeyError(f"class id {i} out of range 1..{len(names) - 1}")
            else:
                if w not in index or index[w] == 0:
                    raise KeyError(f"unknown class {w!r}")
                i = index[w]
            ids.add(i)
        return frozenset(ids)

    # -- event loop ----------------------------------------------------------------------------

    def cost(self, job: Job) -> int:
        """Decoded pixels of the job's image, from its header (no pixel is decoded). Raises the
        ImageError load_image would raise for a bad header or an image over max_pixels."""
        w, h = probe_image(job.data, max_pixels=self.max_pixels)
        return w * h

    def batch_key(self, p: Prepared) -> tuple[int, int] | None:
        """Images batch together only when this is equal: their padded (H, W), so that each gets
        exactly its one-image answer. None (one bucket) with mixed_batches."""
        return None if self.mixed_batches else tuple(self.pipe.padded_size(p.item))

    # -- decode lanes --------------------------------------------------------------------------

    def prepare(self, job: Job, *, alone: bool = False) -> Prepared:
        """alone: nothing else is in flight, so the decode may take a second core (decode_bands)."""
        t0 = time.perf_counter()
        threads = 2 if alone and self.decode_bands else 1
        # in bands, each decoding thread also preprocesses the rows it decoded (the same values)
        bands = self.pipe.bands() if threads == 2 and hasattr(self.pipe, "bands") else None
        image = load_image(job.data, max_pixels=self.max_pixels, threads=threads,
                           after=None if bands is None else bands.rows)
        t1 = time.perf_counter()
        item = self.pipe.prepare(image) if bands is None else self.pipe.prepare(image, bands)
        t2 = time.perf_counter()
        h, w = image.shape[:2]
        return Prepared(job=job, width=w, height=h, item=item, decode_s=t1 - t0, preprocess_s=t2 - t1)

    # -- inference thread ----------------------------------------------------------------------

    def handle(self, items: list[Prepared]) -> list[Answer]:
        start = time.perf_counter()
        batch = self.pipe.collate([p.item for p in items])
        t0 = time.perf_counter()
        raw = self.pipe.infer(batch)
        t1 = time.perf_counter()
        if self.on_backend is not None:
            self.on_backend(t1 - t0)
        options = [self._post_options(p.job) for p in items]
        dets = self.pipe.postprocess(raw, batch, options)
        t2 = time.perf_counter()
        answers = []
        for p, d in zip(items, dets, strict=True):
            boxes, scores, labels = (_np(d.boxes).reshape(-1, 4), _np(d.scores).reshape(-1),
                                     _np(d.labels).reshape(-1).astype(np.int64))
            answers.append(Answer(
                name=p.job.name, width=p.width, height=p.height, boxes=boxes, scores=scores, labels=labels,
                decode_s=p.decode_s, preprocess_s=p.preprocess_s + (t0 - start) / len(items),
                queue_s=max(0.0, start - p.ready_at), backend_s=t1 - t0, postprocess_s=t2 - t1,
                batch_size=len(items)))
        return answers

    def _post_options(self, job: Job) -> Any:
        from runtime import PostOptions

        # The class filter applies before the top-k cut: max_detections counts kept classes only.
        return PostOptions(score_threshold=job.score_threshold, max_detections=job.max_detections,
                           classes=job.classes)

    def tune_batch_size(self, max_batch_size: int, *, min_gain: float = 0.1, repeats: int = 2,
                        size: tuple[int, int] = (480, 640)) -> tuple[int, dict[int, float]]:
        """The largest batch size, doubling from 1 up to max_batch_size, at which one backend call
        over same-size images takes at least `min_gain` less time per image than the size before it
        (best of `repeats` calls each); stops at the first size that does not pay. Returns (size,
        {size: seconds per image}). On a CPU a compute-bound model gains nothing from a batch (R50-FPN
        on onnxruntime here: 1.34 s per image alone, 1.40 s in a batch of 4), so the server runs it
        one image at a time; a GPU's batch pays and is kept."""
        one = self._synthetic(size, np.random.default_rng(0))
        per_image: dict[int, float] = {}
        best, b = 1, 1
        while True:
            items = [one] * b
            if b > 1:  # first call at a new batch size allocates (warmup ran batch 1 at this size)
                self.handle(items)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.handle(items)
                times.append(time.perf_counter() - t0)
            per_image[b] = min(times) / b
            if b > 1:
                if per_image[b] > (1.0 - min_gain) * per_image[best]:
                    break
                best = b
            if b >= max_batch_size:
                break
            b = min(2 * b, max_batch_size)
        return best, per_image

    def warmup(self, sizes: tuple[tuple[int, int], ...] = ((480, 640),)) -> float:
        """Run the whole path once per size (first calls allocate and tune). Returns seconds."""
        from runtime import jpeg_bands

        t0 = time.perf_counter()
        if not self.decode_bands:
            how = "whole (decode_bands off)"
        elif jpeg_bands.available():  # its first-use check, here rather than in the first request
            how = "a lone photo in two bands at once (runtime._jpegbands)"
        else:
            how = "whole (runtime._jpegbands not built, failed its check, or one core)"
        log.info("JPEG decoding: %s", how)
        rng = np.random.default_rng(0)
        for size in sizes:
            self.handle([self._synthetic(size, rng)])
        return time.perf_counter() - t0

    def _synthetic(self, size: tuple[int, int], rng: np.random.Generator) -> Prepared:
        """A prepared random image of (h, w) `size`, as warmup and tuning feed the backend."""
        h, w = size
        item = self.pipe.prepare(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        return Prepared(job=Job("warmup", b"", 0.5, 10), width=w, height=h, item=item, decode_s=0.0,
                        preprocess_s=0.0)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)

