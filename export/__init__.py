"""Export to ONNX (fp32 / fp16 / int8 bundles) and parity checks; TensorRT engines in `tensorrt.py`.

Entry points: ``export_bundle`` (exporter.py), ``run_parity`` (parity.py) and ``tensorrt.build_engines``, each
taking its option schema (``ExportOptions``, ``ParityOptions``, ``EngineOptions``) and/or its fields as keywords. This package may import
``runtimes``, ``tinyclip_edge.models``, ``common`` and ``data``, never the training core.
"""

from ..common.options import EngineOptions, ExportOptions, ParityOptions
from .exporter import DEFAULT_CALIB_COUNT, export_bundle
from .parity import run_parity
from .parity_report import DEFAULT_TOLERANCES, ParityReport, Tolerance
from .precision import PRECISIONS

__all__ = [
    "DEFAULT_CALIB_COUNT",
    "DEFAULT_TOLERANCES",
    "PRECISIONS",
    "EngineOptions",
    "ExportOptions",
    "ParityOptions",
    "ParityReport",
    "Tolerance",
    "export_bundle",
    "run_parity",
]
