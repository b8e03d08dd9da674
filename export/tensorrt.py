"""Exported .onnx -> TensorRT engine (+ JSON sidecar with the graph contract and the profile).

    build_engine("model.int8.onnx", "model.engine", BuildOptions(max_shape=(8, 1024, 1024)))

The network is strongly typed: every layer computes in the type the graph gives it (fp32, the fp16
of a `--precision fp16` graph, the int8 of a `--precision int8` graph's Q/DQ nodes). No precision
builder flags and no calibrator: TensorRT 11 removed both (BuilderFlag.FP16/INT8/BF16,
IBuilderConfig.int8_calibrator, IInt8*Calibrator), and precision is decided once, in the graph, for
every runtime (export/precision.py). Supported: the TensorRT 10.x and 11.x Python APIs.
  10.x: strong typing is opt-in, `create_network(1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)`.
  11.x: every network is strongly typed; the flag is passed where the release still has it.
Both: explicit batch (implied), one optimization profile with min/opt/max for the batch and H/W of
`images` (image_sizes follows the batch), ONNX parser errors one per line, an optional timing cache
read before and written after the build.

The parser lowers RoiAlign (opset >= 16) to the ROIAlign_TRT plugin (hence init_libnvinfer_plugins)
and NonMaxSuppression to INMSLayer, whose data-dependent output count the runtime backend handles
with an IOutputAllocator. vgg16_c4's RoIPool (MaxRoiPool) is not supported by the parser.
No engine has been built on the development machines (no TensorRT, no GPU); tests run this code
against fakes of the 10.x and 11.x module surfaces (tests/export/test_tensorrt_fakes.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from export.tensorrt_ops import tensorrt_problems, tensorrt_ready
from runtime.backends.tensorrt_io import import_tensorrt, sidecar_path
from runtime.contract import GraphMetadata

log = logging.getLogger(__name__)

SUPPORTED_MAJOR = (10, 11)


@dataclass
class BuildOptions:
    timing_cache: str | None = None
    min_shape: tuple[int, int, int] = (1, 320, 320)  # (batch, H, W) of `images`
    opt_shape: tuple[int, int, int] = (4, 608, 1024)
    max_shape: tuple[int, int, int] = (8, 1024, 1024)
    workspace_gb: float = 4.0


def tensorrt_major(trt) -> int:
    major = int(str(trt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJOR:
        raise RuntimeError(f"TensorRT {trt.__version__}: this builder supports TensorRT {SUPPORTED_MAJOR} "
                           "(strongly typed networks)")
    return major


def create_strongly_typed_network(trt, builder):
    """A network whose layers take their types from the graph, on TensorRT 10.x or 11.x."""
    major = tensorrt_major(trt)
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strongly_typed = getattr(flags, "STRONGLY_TYPED", None) if flags is not None else None
    if strongly_typed is None:
        if major == 10:  # 10.0 onwards has it; without it the build would be weakly typed
            raise RuntimeError(f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        return builder.create_network(0)  # 11.x: strongly typed is the only kind
    return builder.create_network(1 << int(strongly_typed))


def _parse(trt, network, logger, model: onnx.ModelProto, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
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
    model = tensorrt_ready(model)  # int32 biases folded to float, symmetric int8, no RoI sort
    problems = tensorrt_problems(model)
    if problems:
        raise RuntimeError(f"{onnx_path} uses what the TensorRT ONNX parser cannot take:\n" + "\n".join(problems))
    trt = import_tensorrt()
    major = tensorrt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ROIAlign_TRT
    builder = trt.Builder(logger)
    network = create_strongly_typed_network(trt, builder)
    _parser = _parse(trt, network, logger, model, onnx_path)  # keep alive until the build is done
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    config.add_optimization_profile(_profile(builder, opts))
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
        "metadata": meta.to_props(),  # "frcnn.precision" included: the graph's, which the engine keeps
        "profile": {"min": opts.min_shape, "opt": opts.opt_shape, "max": opts.max_shape},
        "precision": meta.precision,
        "build": {**asdict(opts), "tensorrt": str(trt.__version__), "tensorrt_major": major,
                  "strongly_typed": True, "onnx": onnx_path.name},
    }
    sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("wrote %s (%.1f MB, %s) and %s", engine_path, engine_path.stat().st_size / 2**20, meta.precision,
             sidecar_path(engine_path).name)
    return engine_path
