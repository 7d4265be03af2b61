"""Finding a TensorRT library, shared by the engine builder (export) and the `trt` runtime.

Two libraries expose the same Python API: TensorRT proper (`tensorrt`, on Jetson from JetPack, on x86 from
NVIDIA's package index) and TensorRT for RTX (`tensorrt_rtx`, on PyPI). They differ where it matters:
TensorRT-RTX networks are always strongly typed (precision comes from the ONNX graph), it has no implicit-int8
calibration and no DLA, and its engines only open with TensorRT-RTX. An engine's sidecar records which
library built it, so the runtime loads that one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..common.errors import UserError

LIBRARIES = ("tensorrt", "tensorrt_rtx")

INSTALL_HINT = (
    "no TensorRT library is installed; on a Jetson use the one JetPack ships "
    "(sudo apt install nvidia-tensorrt; python3 -c 'import tensorrt'), on an RTX GPU "
    "pip install 'tinyclip-edge[rtx]', on other NVIDIA GPUs "
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt"
)


class NoTensorRT(UserError):
    """No usable TensorRT library."""


@dataclass
class TrtLib:
    module: Any  # the imported `tensorrt` or `tensorrt_rtx` module
    name: str  # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def cli(self) -> str:
        """The library's command-line builder, for the equivalent command we print."""
        return "tensorrt_rtx" if self.is_rtx else "trtexec"

    def logger(self, min_severity: str = "WARNING") -> Any:
        return make_logger(self.module, min_severity)


def load_tensorrt(prefer: str | None = None) -> TrtLib:
    """`prefer` (a library name, e.g. from an engine sidecar) is required when given; else the first found."""
    if prefer is not None and prefer not in LIBRARIES:
        raise UserError(f"unknown TensorRT library {prefer!r}; expected one of {', '.join(LIBRARIES)}")
    names = (prefer,) if prefer else LIBRARIES
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:  # a broken install (missing CUDA libs) fails with OSError and friends
            raise NoTensorRT(f"'{name}' is installed but does not import ({type(e).__name__}: {e})") from None
        return TrtLib(mod, name, str(getattr(mod, "__version__", "unknown")))
    if prefer:
        raise NoTensorRT(
            f"this engine was built with '{prefer}', which is not installed here; engines only open "
            f"with the library (and version) that built them: install it or rebuild the engine "
            f"from the ONNX bundle with the library you have"
        )
    raise NoTensorRT(INSTALL_HINT)


def make_logger(trt: Any, min_severity: str = "WARNING") -> Any:
    """An ILogger that keeps error messages (for one readable UserError) and prints warnings."""
    sev = trt.ILogger.Severity
    order = [sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING, sev.INFO, sev.VERBOSE]
    limit = order.index(getattr(sev, min_severity))

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT from its own threads
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(msg)
            elif severity == sev.WARNING:
                self.warnings.append(msg)
            if order.index(severity) <= limit and severity not in (sev.INTERNAL_ERROR, sev.ERROR):
                print(f"[{trt.__name__}] {msg}")

    return CapturingLogger()


# TensorRT DataType name -> numpy dtype name (what the sidecar records and the runtime allocates)
DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def dtype_name(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    return DTYPE_NAMES.get(name, name.lower())
