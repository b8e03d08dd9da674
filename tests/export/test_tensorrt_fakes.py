"""export/tensorrt.py against fakes of the `tensorrt` module's Python surface, 10.x and 11.x.

Nothing can import the real `tensorrt` here (the registry's package is a stub that downloads from
NVIDIA at install time, and there is no GPU), so no engine is built by these tests. Each fake has
only the attributes its release has; what 11.x removed (BuilderFlag.FP16/INT8/BF16, the int8
calibrator interfaces, IBuilderConfig.int8_calibrator / set_calibration_profile) raises
AttributeError, as the real bindings do. Every call is recorded, so the tests check what the builder
did: a strongly typed network, the parsed graph, the optimization profile, the sidecar.
"""

from __future__ import annotations

import json
import sys
import types

import onnx
import pytest

from export.tensorrt import BuildOptions, build_engine


class _Enum:
    """Members given by name -> int; any other attribute raises AttributeError (a removed member)."""

    def __init__(self, name: str, **members: int):
        self._name = name
        for k, v in members.items():
            object.__setattr__(self, k, v)

    def __repr__(self):
        return self._name


def fake_tensorrt(version: str) -> types.ModuleType:
    """A `tensorrt` module with the 10.x or 11.x surface the builder could touch; `trt.calls` records."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple] = []
    trt.calls = calls

    trt.NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", STRONGLY_TYPED=1) if major >= 11 \
        else _Enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    flags = dict(DEBUG=5, REFIT=3, STRIP_PLAN=16, VERSION_COMPATIBLE=9)
    if major == 10:  # the weak-typing flags 11.x removed
        flags |= dict(FP16=0, INT8=1, BF16=17, FP8=11, OBEY_PRECISION_CONSTRAINTS=8,
                      PREFER_PRECISION_CONSTRAINTS=7, DIRECT_IO=4)
    trt.BuilderFlag = _Enum("BuilderFlag", **flags)
    trt.MemoryPoolType = _Enum("MemoryPoolType", WORKSPACE=0)

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            calls.append(("Logger", severity))

    trt.Logger = Logger
    trt.init_libnvinfer_plugins = lambda logger, ns: calls.append(("init_libnvinfer_plugins", ns)) or True

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.parsed: onnx.ModelProto | None = None

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile.set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class TimingCache:
        def serialize(self):
            return b"timing"

    config_slots = ["_profiles"]
    if major == 10:
        config_slots += ["int8_calibrator"]

    class BuilderConfig:
        __slots__ = config_slots  # setting an attribute 11.x removed raises AttributeError

        def __init__(self):
            self._profiles = []

        def set_memory_pool_limit(self, pool, size):
            calls.append(("config.set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile):
            calls.append(("config.add_optimization_profile", profile))
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def set_flag(self, flag):
            calls.append(("config.set_flag", flag))

        def create_timing_cache(self, blob):
            calls.append(("config.create_timing_cache", bytes(blob)))
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("config.set_timing_cache", ignore_mismatch))
            return True

        def get_timing_cache(self):
            return TimingCache()

    if major == 10:
        def set_calibration_profile(self, profile):
            calls.append(("config.set_calibration_profile", profile))
        BuilderConfig.set_calibration_profile = set_calibration_profile

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("builder.create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("builder.build_serialized_network", network.flags, len(config._profiles)))
            assert network.parsed is not None, "built before parsing"
            return b"ENGINE:" + network.parsed.graph.name.encode()

    if major == 10:
        Builder.platform_has_fast_fp16 = property(lambda self: True)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse(self, data, path=None):
            calls.append(("parser.parse", path))
            self.network.parsed = onnx.load_model_from_string(bytes(data))
            return True

        def parse_from_file(self, path):
            calls.append(("parser.parse_from_file", path))
            self.network.parsed = onnx.load(path)
            return True

        def get_error(self, i):
            return ""

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    if major == 10:
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})
        trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (), {})
    return trt


@pytest.fixture(params=["10.13.3", "11.4.0"])
def trt(request, monkeypatch):
    fake = fake_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_fakes_have_only_their_release_surface():
    t10, t11 = fake_tensorrt("10.13.3"), fake_tensorrt("11.4.0")
    assert t10.BuilderFlag.FP16 == 0 and hasattr(t10, "IInt8EntropyCalibrator2")
    for removed in ("FP16", "INT8", "BF16"):
        with pytest.raises(AttributeError):
            getattr(t11.BuilderFlag, removed)
    with pytest.raises(AttributeError):
        t11.IInt8EntropyCalibrator2  # noqa: B018
    with pytest.raises(AttributeError):
        t11.Builder(None).create_builder_config().int8_calibrator = object()


@pytest.mark.parametrize("which", ["tiny_onnx", "tiny_int8_onnx", "tiny_fp16_onnx"])
def test_builder_makes_a_strongly_typed_network_with_the_profile(trt, which, request, tmp_path):
    graph = request.getfixturevalue(which)
    opts = BuildOptions(min_shape=(1, 64, 96), opt_shape=(2, 512, 640), max_shape=(4, 800, 1024),
                        timing_cache=str(tmp_path / "timing.cache"))
    engine = build_engine(graph, tmp_path / "model.engine", opts)
    names = [c[0] for c in trt.calls]
    # strongly typed: the STRONGLY_TYPED creation flag (1 << 1) on 10.x and 11.x; no precision flags
    assert ("builder.create_network", 1 << 1) in trt.calls
    assert "config.set_flag" not in names and "config.set_calibration_profile" not in names
    # one profile, min/opt/max for both inputs, added before the build
    assert ("profile.set_shape", "images", (1, 3, 64, 96), (2, 3, 512, 640), (4, 3, 800, 1024)) in trt.calls
    assert ("profile.set_shape", "image_sizes", (1, 2), (2, 2), (4, 2)) in trt.calls
    assert names.index("config.add_optimization_profile") < names.index("builder.build_serialized_network")
    assert ("builder.build_serialized_network", 1 << 1, 1) in trt.calls
    assert names.index("init_libnvinfer_plugins") < names.index("parser.parse")  # ROIAlign_TRT registered first
    assert engine.read_bytes().startswith(b"ENGINE:")
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"
    sidecar = json.loads(engine.with_suffix(".json").read_text())
    want = {"tiny_onnx": "fp32", "tiny_int8_onnx": "int8", "tiny_fp16_onnx": "fp16"}[which]
    assert sidecar["precision"] == want and json.loads(sidecar["metadata"]["frcnn.precision"]) == want
    assert sidecar["build"]["strongly_typed"] is True and sidecar["build"]["tensorrt"] == trt.__version__
    assert sidecar["profile"]["max"] == [4, 800, 1024]


def test_parsed_int8_graph_dequantizes_only_int8(trt, tiny_int8_onnx, tmp_path):
    """What the parser is given: int8 Q/DQ with zero points 0; the int32 biases onnxruntime's
    quantizer writes are folded to float first."""
    import tensorrt  # the fake

    parsed = {}
    real_parse = tensorrt.OnnxParser.parse

    def spy(self, data, path=None):
        parsed["model"] = onnx.load_model_from_string(bytes(data))
        return real_parse(self, data, path)

    tensorrt.OnnxParser.parse = spy
    build_engine(tiny_int8_onnx, tmp_path / "model.engine")
    m = parsed["model"]
    inits = {i.name: i for i in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dq if n.input[0] in inits)
    assert {n.op_type for n in m.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "RoiAlign"}


def test_unsupported_release_is_refused(monkeypatch, tiny_onnx, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("9.3.0"))
    with pytest.raises(ImportError, match="10 and 11"):
        build_engine(tiny_onnx, tmp_path / "model.engine")
