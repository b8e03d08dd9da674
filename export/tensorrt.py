"""Exported .onnx -> TensorRT 10 engine (+ JSON sidecar with the graph contract and the profile).

    build_engine("model.onnx", "model.engine", BuildOptions(fp16=True))

Explicit batch (the only mode in TensorRT 10); one optimization profile with min/opt/max for the
batch and H/W of `images` (image_sizes follows the batch); ONNX parser errors are reported one per
line; an optional timing cache is read before and written after the build; fp16; int8 through an
entropy calibrator over --calib-images (cached in --calib-cache).

The parser lowers RoiAlign (opset >= 16) to the ROIAlign_TRT plugin (hence init_libnvinfer_plugins)
and NonMaxSuppression to INMSLayer, whose data-dependent output count the runtime backend handles
with an IOutputAllocator. vgg16_c4's RoIPool (MaxRoiPool) is not supported by the parser.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from export.tensorrt_ops import tensorrt_problems
from runtime.backends.tensorrt_io import import_tensorrt, sidecar_path
from runtime.contract import GraphMetadata

log = logging.getLogger(__name__)



@dataclass
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    calib_images: str | None = None
    calib_cache: str | None = None
    calib_batches: int = 16
    timing_cache: str | None = None
    min_shape: tuple[int, int, int] = (1, 320, 320)  # (batch, H, W) of `images`
    opt_shape: tuple[int, int, int] = (4, 608, 1024)
    max_shape: tuple[int, int, int] = (8, 1024, 1024)
    workspace_gb: float = 4.0


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
    return parser


def _profile(builder, opts: BuildOptions):
    profile = builder.create_optimization_profile()
    (b0, h0, w0), (b1, h1, w1), (b2, h2, w2) = opts.min_shape, opts.opt_shape, opts.max_shape
    profile.set_shape("images", (b0, 3, h0, w0), (b1, 3, h1, w1), (b2, 3, h2, w2))
    profile.set_shape("image_sizes", (b0, 2), (b1, 2), (b2, 2))
    return profile


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: BuildOptions | None = None) -> Path:
    """Build and write `engine_path` and its sidecar. Raises with the parser's errors on failure."""
    opts = opts or BuildOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = GraphMetadata.from_props({p.key: p.value for p in model.metadata_props})
    problems = tensorrt_problems(model)
    if problems:
        raise RuntimeError(f"{onnx_path} uses what TensorRT 10 cannot parse:\n" + "\n".join(problems))
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ROIAlign_TRT
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is implied in TensorRT 10
    _parser = _parse(trt, network, logger, onnx_path)  # keep alive until the build is done
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    profile = _profile(builder, opts)
    config.add_optimization_profile(profile)
    if opts.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if opts.int8:
        if not (opts.calib_images or (opts.calib_cache and Path(opts.calib_cache).exists())):
            raise ValueError("--int8 needs --calib-images (or an existing --calib-cache)")
        from export.tensorrt_calib import EntropyCalibrator

        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = EntropyCalibrator(
            meta.input_settings, images_dir=opts.calib_images, cache_path=opts.calib_cache,
            batch_size=opts.opt_shape[0], hw=opts.opt_shape[1:], max_batches=opts.calib_batches)
        config.set_calibration_profile(profile)
    cache = None
    if opts.timing_cache:
        blob = Path(opts.timing_cache).read_bytes() if Path(opts.timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        Path(opts.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "metadata": meta.to_props(),
        "profile": {"min": opts.min_shape, "opt": opts.opt_shape, "max": opts.max_shape},
        "precision": {"fp16": opts.fp16, "int8": opts.int8},
        "build": {**asdict(opts), "tensorrt": trt.__version__, "onnx": onnx_path.name},
    }
    sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("wrote %s (%.1f MB) and %s", engine_path, engine_path.stat().st_size / 2**20,
             sidecar_path(engine_path).name)
    return engine_path
