"""Stand-ins for TensorRT 8.6, 10.x and 11.x's Python API (`import tensorrt`), for the builder's version checks.

TensorRT proper cannot be installed on this CPU-only machine, so each stand-in reproduces the API surface the
builder touches, version by version, and fails where the real module fails (from NVIDIA's API references and the
10.x -> 11.x migration guide's list of removed Python APIs):

- enum members that a version lacks raise AttributeError (``BuilderFlag.FP16`` on 11.x, ``STRONGLY_TYPED`` on 8.6,
  ``EXPLICIT_BATCH`` on 11.x, ``DataType.FP8`` nowhere before 8.6);
- ``IInt8EntropyCalibrator2`` and kin, ``CalibrationAlgoType`` and ``IBuilderConfig.int8_calibrator`` /
  ``set_calibration_profile`` exist on 8.6 and 10.x only; the config has ``__slots__``, so assigning a removed
  attribute raises AttributeError as pybind11's objects do;
- 8.6 networks without EXPLICIT_BATCH are implicit-batch, which the ONNX parser rejects; a strongly typed network
  given a precision flag fails to build (10.x logs an error and returns None); DLA needs a device with DLA cores.

Building returns placeholder bytes: what is tested is which calls the builder makes, not the engine.
``TRTEXEC_FLAGS`` lists, per version, the trtexec options of those the builder may print that the version accepts.
"""

from __future__ import annotations

import enum
import types
from pathlib import Path
from typing import Any

_COMMON_FLAGS = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE"]
_WEAK_FLAGS = ["OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"]
BUILDER_FLAGS = {
    "8.6": _COMMON_FLAGS + _WEAK_FLAGS + ["FP16", "INT8", "FP8", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"],
    "10": _COMMON_FLAGS
    + _WEAK_FLAGS
    + ["FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    + ["WEIGHT_STREAMING", "STRIP_PLAN", "REFIT_IDENTICAL"],
    "11": _COMMON_FLAGS
    + ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "WEIGHT_STREAMING", "STRIP_PLAN", "REFIT_IDENTICAL"]
    + ["EDITABLE_TIMING_CACHE", "ERROR_ON_TIMING_CACHE_MISS"],
}
NETWORK_FLAGS = {
    "8.6": {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1},
    "10": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    "11": {"STRONGLY_TYPED": 1},
}
DATA_TYPES = {
    "8.6": ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8"],
    "10": ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "INT4", "FP4"],
    "11": ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "INT4", "FP4", "E8M0"],
}
_SHAPES = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--memPoolSize", "--timingCacheFile"}
_DLA = {"--useDLACore", "--allowGPUFallback"}
TRTEXEC_FLAGS = {
    "8.6": _SHAPES | _DLA | {"--fp16", "--int8", "--fp8", "--calib"},  # --stronglyTyped came with 9.x
    "10": _SHAPES | _DLA | {"--fp16", "--int8", "--fp8", "--bf16", "--calib", "--stronglyTyped"},
    "11": _SHAPES | _DLA,  # precision flags, --calib and --best removed; strong typing always on
}
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 16: "BF16"}


def _series(version: str) -> str:
    return "8.6" if version.startswith("8.") else version.split(".")[0]


def standin(version: str, dla_cores: int = 0) -> types.ModuleType:
    """A module named `tensorrt` with `version`'s API surface (8.6.x, 10.x or 11.x)."""
    series = _series(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", BUILDER_FLAGS[series], start=0)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", NETWORK_FLAGS[series])
    trt.DataType = enum.IntEnum("DataType", DATA_TYPES[series], start=0)
    trt.DeviceType = enum.IntEnum("DeviceType", ["GPU", "DLA"], start=0)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM"], start=0)
    weak = series != "11"

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0)

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (lo, opt, hi)

    config_slots = ["flags", "profiles", "pool", "DLA_core", "default_device_type", "timing_cache"]
    if weak:
        config_slots += ["int8_calibrator", "calibration_profile"]

    class IBuilderConfig:
        __slots__ = config_slots

        def __init__(self) -> None:
            self.flags: set[int] = set()
            self.profiles: list = []
            self.DLA_core = -1
            self.default_device_type = trt.DeviceType.GPU

        def set_flag(self, flag: Any) -> None:
            self.flags.add(int(flag))

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pool = (pool, size)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    if weak:

        def set_calibration_profile(self: Any, profile: OptimizationProfile) -> None:
            self.calibration_profile = profile

        IBuilderConfig.set_calibration_profile = set_calibration_profile
        for name in ("IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
            setattr(trt, name, type(name, (), {"__init__": lambda self: None}))
        trt.CalibrationAlgoType = enum.IntEnum("CalibrationAlgoType", ["ENTROPY_CALIBRATION_2", "MINMAX_CALIBRATION"])
    trt.IBuilderConfig = IBuilderConfig

    class Tensor:
        def __init__(self, name: str, dtype: Any, shape: list[int]) -> None:
            self.name, self.dtype, self.shape = name, dtype, shape

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []

        def get_flag(self, flag: Any) -> bool:
            return bool(self.flags & (1 << int(flag)))

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> Any:
            desc = self.errors[i]
            return types.SimpleNamespace(
                node=lambda: -1, node_operator=lambda: "", node_name=lambda: "", desc=lambda: desc
            )

        def parse_from_file(self, path: str) -> bool:
            import onnx

            explicit = trt.NetworkDefinitionCreationFlag.__members__.get("EXPLICIT_BATCH")
            if explicit is not None and series == "8.6" and not self.network.get_flag(explicit):
                self.errors.append("the ONNX parser only supports networks with an explicit batch dimension")
                return False
            graph = onnx.load(str(Path(path)), load_external_data=False).graph

            def tensor(v: Any) -> Tensor:
                t = v.type.tensor_type
                shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
                return Tensor(v.name, getattr(trt.DataType, _ONNX_TYPES[t.elem_type]), shape)

            self.network.inputs = [tensor(v) for v in graph.input]
            self.network.outputs = [tensor(v) for v in graph.output]
            return True

    trt.OnnxParser = OnnxParser

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            strong = trt.NetworkDefinitionCreationFlag.__members__.get("STRONGLY_TYPED")
            members = trt.BuilderFlag.__members__
            precision = {int(members[f]) for f in ("FP16", "INT8", "BF16", "FP8") if f in members}
            if strong is not None and network.get_flag(strong) and config.flags & precision:
                self.logger.log(ILogger.Severity.ERROR, "precision flags are not allowed on strongly typed networks")
                return None
            return b"standin-engine " + trt.__version__.encode() * 64

    if weak:
        Builder.platform_has_fast_fp16 = True
    trt.Builder = Builder

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.DLA_core = -1

    trt.Runtime = Runtime
    return trt
