"""fp16 and int8 versions of an fp32 tower graph (ONNX Runtime's converters and quantizers).

fp16: every float tensor becomes float16 except the ops in ``FP32_OPS`` (LayerNorm, softmax, reductions,
which overflow or lose the most in half precision); the image input is float16, the output stays float32.

int8 (static, ``int8``): QDQ format, symmetric int8 activations (per tensor) and weights (per channel),
calibrated on real data. TensorRT reads this format (explicit quantization). ``int8-dynamic``: weights
int8, activations quantized at run time (MatMulInteger) — for ONNX Runtime on CPUs; TensorRT cannot read it.
Both keep weights in 7 bits (``reduce_range``) so that every x86 CPU computes the same integer products: without VNNI,
ONNX Runtime multiplies u8 activations by s8 weights with ``vpmaddubsw``, which saturates each sum of two
products at int16 (255 * 127 * 2 > 32767); with |w| <= 64 no such sum can (255 * 64 * 2 = 32640). docs/EXPORT.md
("int8 on every CPU") has the evidence and what it costs on a VNNI CPU.
Both quantize only MatMul/Gemm with constant weights: the attention products (two activations), the patch
embedding (the image tower's Conv) and the output projection stay float by default. The patch embedding
stays float because how a runtime executes a u8/s8 convolution differs between CPUs and libraries (without
VNNI some saturate intermediate sums), so a quantized one makes the graph's accuracy depend on the runtime;
docs/EXPORT.md has what keeping it float costs. With ``keep="auto"`` the per-node sensitivity decides which
further nodes stay float (binary search over the sensitivity order) until the tower reaches ``min_cosine``
against fp32 on held-out inputs: the calibration data is split, the first ``holdout_count(n)`` inputs are
only measured on, the rest only calibrate.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..common.embeddings import row_cosine
from ..common.errors import MissingDependency, UserError
from ..common.options import CalibMethod
from ..common.vocab import EXPORT_PRECISIONS
from ..runtimes.onnxrt import create_session, run_session
from .graphs import OUTPUT_NAME, graph_opset
from .quant_plan import CALIB_BATCH, EVAL_SAMPLES, PATCH_EMBED_OPS, holdout_count, weight_nodes

PRECISIONS = EXPORT_PRECISIONS  # defined once, with the option schema (common/options.py)
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt")
WEIGHT_OPS = {"int8": ("MatMul", "Gemm"), "int8-dynamic": ("MatMul", "Gemm")}
CALIB_METHODS: tuple[str, ...] = typing.get_args(CalibMethod)
PROBE_SAMPLES = 32  # of those, used to rank single-node sensitivity (one probe per node: keep it cheap)
# 7-bit weights: no u8 x s8 pair sum can saturate int16 on an x86 CPU without VNNI (module doc)
REDUCE_RANGE = True


@dataclass
class QuantOptions:
    keep: str | Sequence[str] = "auto"  # "auto", "none", or node-name substrings to keep float
    min_cosine: float = 0.995  # target of the auto search (min row cosine vs fp32)
    method: str = "minmax"  # static calibration method
    quantize_patch_embedding: bool = False  # static int8 only: also quantize the image tower's Conv


def check_quantizer_compatible() -> None:
    """onnxruntime < 1.19's quantizer uses ``onnx.mapping``, which onnx 1.19 removed: say so before it fails
    half-way with an AttributeError. (setup.cfg allows onnxruntime >= 1.18 and onnx >= 1.16, so the pair can meet.)"""
    import onnx
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 19) and not hasattr(onnx, "mapping"):
        raise UserError(
            f"onnxruntime {onnxruntime.__version__}'s quantizer needs onnx < 1.19 (it uses onnx.mapping, "
            f"which onnx {onnx.__version__} no longer has): pip install 'onnx<1.19', or upgrade "
            "onnxruntime to 1.19 or newer"
        )


@functools.cache
def supports_calibration_cache() -> bool:
    """Whether this ONNX Runtime's ``quantize_static`` can save and reuse one calibration
    (``calibration_cache_path``, added in recent releases; older ones, e.g. Jetson wheels, calibrate every run)."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _toposort(graph: Any) -> None:
    """The fp16 converter appends its Cast nodes at the end; the ONNX checker wants topological order."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise UserError("fp16 conversion produced a graph with a cycle; export fp32 and report this model")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(fp32: Path, out: Path) -> dict[str, Any]:
    import onnx

    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise MissingDependency("onnxruntime", "cpu", "fp16 conversion") from None
    model = onnx.load(str(fp32))
    if graph_opset(model) < 17:
        raise UserError(
            "fp16 export needs --opset 17 or newer: below 17 LayerNorm is split into primitive ops "
            "that cannot be kept in fp32 as a unit"
        )
    with _quiet():
        half = convert_float_to_float16(
            model, keep_io_types=[OUTPUT_NAME], op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS)
        )
    _toposort(half.graph)
    onnx.save_model(half, str(out))
    kept = sorted({n.op_type for n in half.graph.node if n.op_type in FP32_OPS})
    return {"fp32_ops": kept, "output": "float32"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs and prints progress meant for its own CLI examples."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        logger.setLevel(level)


class _Reader:
    """ORT calibration reader over an in-memory array."""

    def __init__(self, name: str, data: np.ndarray):
        self.batches = iter([{name: data[i : i + CALIB_BATCH]} for i in range(0, len(data), CALIB_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


class _Quantizer:
    """Quantizes one tower repeatedly with different float-kept nodes, reusing one calibration."""

    def __init__(self, fp32: Path, work: Path, tower: str, precision: str, data: np.ndarray | None, opts: QuantOptions):
        import onnx

        self.fp32, self.work, self.tower, self.precision, self.opts = fp32, work, tower, precision, opts
        model = onnx.load(str(fp32), load_external_data=False)
        self.input = model.graph.input[0].name
        self.op_types = list(WEIGHT_OPS[precision])
        if precision == "int8" and opts.quantize_patch_embedding:
            self.op_types += list(PATCH_EMBED_OPS)
        self.candidates, self.always = weight_nodes(model, self.op_types)
        held = holdout_count(len(data), precision) if data is not None else 0
        # disjoint: the held-out inputs only measure, the rest only calibrate (static int8)
        self.eval_x = data[:held] if held else None
        self.calib_x = data[held:] if data is not None and precision == "int8" else None
        self.cache = work / f"{tower}.calib.json"
        # a cache left by another quantizer (other data, or other op types and so other calibrated tensors) would
        # be reused silently: each quantizer calibrates afresh, then its own search reuses that calibration
        self.cache.unlink(missing_ok=True)
        self.reuse_calibration = supports_calibration_cache()
        self.ref = run_session(create_session(fp32), self.eval_x) if self.eval_x is not None else None
        self.runs = 0

    def quantize(self, out: Path, keep: Sequence[str] = (), only: Sequence[str] | None = None) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        exclude = list(self.always) + [n for n in keep if n not in self.always]
        common = dict(
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(self.op_types),
            nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=exclude,
        )
        self.runs += 1
        with _quiet():
            if self.precision == "int8-dynamic":
                quantize_dynamic(str(self.fp32), str(out), **common)
                return
            method = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[self.opts.method]
            # Reuse one calibration across the search's runs where ONNX Runtime can; older releases calibrate again.
            cache = {"calibration_cache_path": str(self.cache)} if self.reuse_calibration else {}
            # TensorRT reads QDQ graphs whose zero points are 0: symmetric activations and weights.
            quantize_static(
                str(self.fp32),
                str(out),
                _Reader(self.input, self.calib_x),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                },
                **cache,
                **common,
            )

    def score(self, path: Path, samples: int = EVAL_SAMPLES) -> tuple[float, float]:
        """(min, mean) row cosine of the quantized tower vs fp32 on the first `samples` held-out inputs."""
        cos = row_cosine(run_session(create_session(path), self.eval_x[:samples]), self.ref[:samples])
        return float(cos.min()), float(cos.mean())


def quantize(
    fp32: Path,
    out: Path,
    work: Path,
    tower: str,
    precision: str,
    data: np.ndarray | None,
    opts: QuantOptions,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the int8 (or fp8: export/fp8.py) graph of one tower to `out`; return what the manifest records."""
    if precision == "fp8":
        from .fp8 import quantize_fp8

        return quantize_fp8(fp32, out, work, tower, data)
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise MissingDependency("onnxruntime", "cpu", "int8 quantization") from None
    check_quantizer_compatible()
    if precision == "int8" and (data is None or len(data) == 0):
        raise UserError("int8 (static) quantization needs calibration data: pass --calib SPEC (e.g. scenes:calib)")
    q = _Quantizer(fp32, work, tower, precision, data, opts)
    keep: list[str] = []
    if opts.keep not in ("auto", "none"):
        keep = [n for n in q.candidates if any(p in n for p in opts.keep)]
    q.quantize(out, keep)
    measured = q.score(out) if q.eval_x is not None else None
    sensitivity: dict[str, float] = {}
    if opts.keep == "auto" and measured is not None and measured[0] < opts.min_cosine:
        keep, measured, sensitivity = _auto_keep(q, out, opts.min_cosine, progress)
    details: dict[str, Any] = {
        "mode": "static-qdq" if precision == "int8" else "dynamic",
        "weights": "int8 symmetric per-channel" + (", 7-bit range (reduce_range)" if REDUCE_RANGE else ""),
        "activations": (
            "int8 symmetric per-tensor (calibrated)"
            if precision == "int8"
            else "uint8 per-tensor, scale computed at run time"
        ),
        "quantized_nodes": len([n for n in q.candidates if n not in keep]),
        "float_nodes": q.always + keep,
        "keep": opts.keep if isinstance(opts.keep, str) else list(opts.keep),
    }
    if precision == "int8":
        details["calibration_method"] = opts.method
        details["calibration_samples"] = len(q.calib_x)
    if measured is not None:
        details["check"] = {
            "samples": len(q.eval_x),
            "min_cosine": measured[0],
            "mean_cosine": measured[1],
            "target_min_cosine": opts.min_cosine if opts.keep == "auto" else None,
        }
    if sensitivity:
        details["sensitivity"] = sensitivity
        details["quantization_runs"] = q.runs
    return details


def _auto_keep(
    q: _Quantizer, out: Path, target: float, progress: bool
) -> tuple[list[str], tuple[float, float], dict[str, float]]:
    """Keep float the fewest most-sensitive nodes with which the tower meets `target`.

    Sensitivity: one probe per node, quantizing that node alone. Then a binary search over how many of
    the most sensitive nodes stay float (error shrinks, near enough monotonically, as more stay float),
    so the full-graph evaluations grow with log2(nodes), not with nodes."""
    probe = q.work / f"{q.tower}.probe.onnx"
    sensitivity = {}
    for node in tqdm(q.candidates, desc=f"int8 sensitivity ({q.tower})", disable=not progress, leave=False):
        q.quantize(probe, only=[node])
        sensitivity[node] = 1.0 - q.score(probe, PROBE_SAMPLES)[1]
    order = sorted(sensitivity, key=sensitivity.get, reverse=True)
    lo, hi = 0, len(order)  # keeping `lo` nodes float misses the target; keeping all of them meets it
    best: tuple[float, float] = (1.0, 1.0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        q.quantize(probe, order[:mid])
        measured = q.score(probe)
        if measured[0] >= target:
            hi, best = mid, measured
        else:
            lo = mid
    keep = order[:hi]
    q.quantize(out, keep)
    if hi == len(order):  # nothing quantized met the target: say what the all-float graph measures
        best = q.score(out)
    return keep, best, {k: round(v, 6) for k, v in sensitivity.items()}
