"""What the loaded TensorRT library can build, probed once from the module itself (never from its name alone).

TensorRT's Python API changed under the same import name: 8.6 has precision builder flags and calibrators but
no strongly typed networks; 9.x/10.x have all three (10.x deprecates implicit int8); 11.x removed the weak-typing
API (``BuilderFlag.FP16``/``INT8``/``FP8``/``BF16``, ``IInt8*Calibrator``, ``IBuilderConfig.int8_calibrator``,
``EXPLICIT_BATCH``, trtexec's ``--fp16``/``--int8``/``--calib``/``--best``): every network is strongly typed, so
precision comes from the ONNX graph (fp16 tensors, Q/DQ nodes). TensorRT for RTX is strongly typed only, with
no calibrators and no DLA. DLA left TensorRT with 11.0 and came back, strongly typed, in 11.4.1 (Jetson AGX Orin,
JetPack 7.2.2+); that is the one rule read from the version, since the bindings keep ``DeviceType.DLA`` anyway.

``export/tensorrt.py`` decides every build path from a ``TrtCaps``; docs/ENGINES.md has the resulting table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..runtimes.trtlib import TrtLib

PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4")
DLA_GAP = ((11, 0, 0), (11, 4, 1))  # TensorRT versions in [from, to) with no DLA on Jetson


def parse_version(text: str) -> tuple[int, int, int]:
    """'10.3.0.26' -> (10, 3, 0); unparsable parts count as 0."""
    parts = [int(m) for m in re.findall(r"\d+", text)[:3]]
    return (*parts, 0, 0, 0)[:3]  # type: ignore[return-value]


@dataclass(frozen=True)
class TrtCaps:
    """The build capabilities of one loaded TensorRT library."""

    name: str  # tensorrt | tensorrt_rtx
    version: str
    is_rtx: bool
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT >= 9, RTX)
    explicit_batch_flag: bool  # NetworkDefinitionCreationFlag.EXPLICIT_BATCH (needed by 8.x, gone in 11)
    precision_flags: frozenset[str]  # the BuilderFlag precision members present (weak typing); empty on 11 / RTX
    calibrators: bool  # IInt8EntropyCalibrator2 and IBuilderConfig.int8_calibrator (implicit int8)
    dla_api: bool  # DeviceType.DLA and IBuilderConfig.DLA_core
    fp8_type: bool  # DataType.FP8
    int4_type: bool  # DataType.INT4

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        return parse_version(self.version)

    @property
    def label(self) -> str:
        return f"{'TensorRT for RTX' if self.is_rtx else 'TensorRT'} {self.version}"

    @property
    def weakly_typed(self) -> bool:
        """Whether precision can come from builder flags (the only way to change precision at build time)."""
        return "FP16" in self.precision_flags

    @property
    def dla(self) -> bool:
        lo, hi = DLA_GAP
        return self.dla_api and not self.is_rtx and not lo <= self.version_tuple < hi

    @property
    def fp8(self) -> bool:
        """Builds FP8 Q/DQ graphs: needs the FP8 type and strong typing (8.6's FP8 was Hopper-plugin only)."""
        return self.fp8_type and self.strongly_typed

    @property
    def cli_strongly_typed_flag(self) -> bool:
        """trtexec takes --stronglyTyped from 9.x to 10.x; 11.x is always strongly typed, RTX's CLI too."""
        return self.strongly_typed and not self.is_rtx and self.version_tuple[0] < 11

    def dla_refusal(self) -> str:
        """Why --dla cannot build here, and what to do instead."""
        if self.is_rtx:
            return "DLA needs TensorRT proper (JetPack on a Jetson); TensorRT for RTX has no DLA: drop --dla"
        if not self.dla_api:
            return f"{self.label} has no DLA API (no DeviceType.DLA): drop --dla, or build with JetPack's TensorRT"
        return (
            f"{self.label} has no DLA on Jetson (DLA is in TensorRT 10.x up to JetPack 6, and again from 11.4.1 "
            "with JetPack 7.2.2 on AGX Orin): drop --dla or build with one of those"
        )


def probe(lib: TrtLib) -> TrtCaps:
    """Read the capabilities from the module's attributes (hasattr only: nothing is built or called)."""
    trt = lib.module
    net_flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    builder_flags = getattr(trt, "BuilderFlag", None)
    data_types = getattr(trt, "DataType", None)
    config = getattr(trt, "IBuilderConfig", None)
    device = getattr(trt, "DeviceType", None)
    return TrtCaps(
        name=lib.name,
        version=lib.version,
        is_rtx=lib.is_rtx,
        strongly_typed=lib.is_rtx or hasattr(net_flags, "STRONGLY_TYPED"),
        explicit_batch_flag=hasattr(net_flags, "EXPLICIT_BATCH"),
        precision_flags=frozenset(f for f in PRECISION_FLAGS if hasattr(builder_flags, f)),
        calibrators=hasattr(trt, "IInt8EntropyCalibrator2") and _has(config, "int8_calibrator"),
        dla_api=hasattr(device, "DLA") and _has(config, "DLA_core"),
        fp8_type=hasattr(data_types, "FP8"),
        int4_type=hasattr(data_types, "INT4"),
    )


def _has(cls: Any, attr: str) -> bool:
    return cls is not None and hasattr(cls, attr)
