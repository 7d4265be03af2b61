"""The project's shared names, each defined once: the two towers and the precisions of each artifact.

Formats (common/formats/), options (common/options.py), the exporter, the engine builder and the runtimes
import these; a ``Literal`` is the type a typed field checks, its tuple the list a message or a loop uses."""

from __future__ import annotations

import typing
from typing import Literal

Tower = Literal["image", "text"]
TOWERS: tuple[str, ...] = typing.get_args(Tower)

# What an ONNX bundle can hold (export/precision.py implements each).
ExportPrecision = Literal["fp32", "fp16", "int8", "int8-dynamic", "fp8"]
EXPORT_PRECISIONS: tuple[str, ...] = typing.get_args(ExportPrecision)
# What a TensorRT engine is built at (export/tensorrt.py); int8-dynamic is an ONNX Runtime graph rewrite.
EnginePrecision = Literal["fp32", "fp16", "int8", "fp8"]
ENGINE_PRECISIONS: tuple[str, ...] = typing.get_args(EnginePrecision)
# What the PyTorch runtime computes in (runtimes/pyt.py).
PytPrecision = Literal["fp32", "fp16", "bf16"]
