"""The options of an ONNX export, an engine build, a parity check and a benchmark: one schema each, shared by
every way to ask for them.

``tinyclip-edge export`` (``--format onnx`` / ``engine``), ``parity`` and ``bench`` build these from their flags,
a recipe's ``export:`` / ``engines:`` / ``bench:`` sections are subclasses of them (adding what only the pipeline
needs: which models and precisions) and ``export.parity_options`` is one, and the Python API (``export_bundle``,
``build_engines``, ``run_parity``, ``run_bench``) takes them (or their fields as keyword arguments). All three
validate through ``typed`` with the same types and ranges, so they cannot drift (tests/test_options.py
checks that every field has a click flag, and every flag a field, with the same default).

This module is a leaf: the core, ``export`` and ``runtimes`` all import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from .devices import CONCRETE_DEVICE
from .errors import UserError
from .typed import Range, validate
from .vocab import PytPrecision

CalibMethod = Literal["minmax", "percentile", "entropy"]
Exporter = Literal["torchscript", "dynamo"]
# Opsets the exporters write (torch 2.x): the torchscript exporter up to 20, dynamo from 18 to 23.
# Below 14 the attention graph needs ops those opsets lack.
OPSET_RANGE = Range(14, 23)
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18

Tower = Literal["image", "text", "both"]
Backend = Literal["pyt", "onnxrt", "trt"]
MAX_BATCH = 65536  # a batch above this is a typo (CLIP towers at that batch need >100 GB of activations)
ENGINE_MAX_BATCH = 4096  # engine optimisation profiles: edge engines use a few dozen at most


@dataclass
class ExportOptions:
    """How to export a model to an ONNX bundle (what and where, precision and out, are per call)."""

    opset: Annotated[int, OPSET_RANGE] = 17  # ONNX opset, in [14, 23]; fp16 needs >= 17
    raw: bool = False  # raw embeddings instead of L2-normalised ones
    calib: str | None = None  # calibration data for static int8 (e.g. scenes:calib)
    calib_count: Annotated[int, Range(1, None)] = 512  # calibration images, >= 1
    calib_method: CalibMethod = "minmax"  # static int8 calibration: minmax | percentile | entropy
    int8_keep: Literal["auto", "none"] | list[str] = "auto"  # nodes kept float: auto search, none, or name parts
    int8_min_cosine: Annotated[float, Range(0, 1, lo_open=True)] = 0.995  # auto search target, in (0, 1]
    exporter: Exporter = "torchscript"  # torchscript (opset <= 20) | dynamo (opset >= 18)

    def validate_fields(self, path: str) -> None:
        at = f"{path}." if path else ""
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise UserError(
                f"{at}exporter dynamo writes opset {DYNAMO_MIN_OPSET} or newer, got {at}opset "
                f"{self.opset}; set opset to 18 or use the torchscript exporter"
            )
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise UserError(
                f"{at}exporter torchscript writes opset {TORCHSCRIPT_MAX_OPSET} at most, got "
                f"{at}opset {self.opset}; lower it or use exporter dynamo"
            )
        if isinstance(self.int8_keep, list) and not all(k.strip() for k in self.int8_keep):
            raise UserError(f"{at}int8_keep must list non-empty node-name parts, got {self.int8_keep!r}")


@dataclass
class BenchOptions:
    """How to time artifacts (which artifacts, and where the report goes, are per call)."""

    batches: list[Annotated[int, Range(1, MAX_BATCH)]] = field(default_factory=lambda: [1])  # batch sizes
    tower: Tower = "both"  # image | text | both
    device: CONCRETE_DEVICE = "cpu"  # cpu | cuda | cuda:N
    iters: Annotated[int, Range(2, None)] | None = None  # timed repetitions per cell, >= 2 (default 20)
    seconds: Annotated[float, Range(0, None, lo_open=True)] | None = None  # or: timed seconds per cell, > 0
    warmup: Annotated[int, Range(0, None)] = 5  # untimed calls first, >= 0
    end_to_end: bool = False  # include preprocessing and tokenising
    backend: Backend | None = None  # force a runtime; default: picked per artifact
    threads: Annotated[int, Range(1, None)] | None = None  # CPU threads for PyTorch / ONNX Runtime, >= 1
    precision: PytPrecision | None = None  # PyTorch model dirs only: fp32 | fp16 | bf16
    power: bool | None = None  # sample tegrastats (None: when it exists)
    power_interval_ms: Annotated[int, Range(1, 60_000)] = 100  # tegrastats interval in ms, in [1, 60000]

    def validate_fields(self, path: str) -> None:
        if not self.batches:
            raise UserError(f"{path + '.' if path else ''}batches must list at least one batch size")
        if len(set(self.batches)) != len(self.batches):  # a cell timed twice, and a speed-up taken from the copy
            raise UserError(f"{path + '.' if path else ''}batches lists a batch size twice: {self.batches}")


@dataclass
class EngineOptions:
    """How to build TensorRT engines from a bundle (which bundle, precision and towers are per call).

    The profile's rules are checked by ``validate_fields`` in the caller's words (``--batch-profile`` on the CLI
    and in the API, ``engines.batch_profile`` in a recipe), so every door gives the same message."""

    batch_profile: list[int] = field(default_factory=lambda: [1, 8, 32])  # MIN, OPT, MAX batch of the profile
    workspace_mb: Annotated[int, Range(1, None)] | None = None  # builder workspace in MiB, >= 1 (None: the device's)
    dla_core: Annotated[int, Range(0, None)] | None = None  # DLA core (Jetson), >= 0; DLA runs fp16 / int8
    timing_cache: str | None = None  # timing cache file, read and updated (TensorRT proper)
    calib: str | None = None  # implicit int8 from an fp32 bundle only (TensorRT 8.6-10.x): calibration data
    calib_count: Annotated[int, Range(1, None)] = 512  # calibration images, >= 1
    calib_cache: str | None = None  # calibration cache file (default: <tower>.calib.cache in the bundle)

    def validate_fields(self, path: str) -> None:
        def name(key: str) -> str:
            return f"{path}.{key}" if path else engine_flag_name(key)

        profile = name("batch_profile")
        if len(self.batch_profile) != 3:
            raise UserError(f"{profile} needs three integers MIN,OPT,MAX (e.g. 1,8,32), got {self.batch_profile}")
        lo, opt, hi = self.batch_profile
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"{profile} must satisfy 1 <= MIN <= OPT <= MAX, got {lo},{opt},{hi}")
        if hi > ENGINE_MAX_BATCH:
            raise UserError(
                f"{profile} max {hi} is above the limit of {ENGINE_MAX_BATCH}; engines for edge devices use "
                f"batches of a few dozen at most (e.g. {profile} 1,8,32)"
            )
        if self.calib_cache is not None and self.calib is None:
            raise UserError(
                f"{name('calib_cache')} is the cache of an int8 calibration, which only {name('calib')} starts; "
                f"drop {name('calib_cache')} or add {name('calib')} DATA"
            )

    @property
    def profile(self) -> tuple[int, int, int]:
        lo, opt, hi = self.batch_profile
        return lo, opt, hi


# How the CLI names an engine option where the flag is not the field's name (cli_name spells the others).
ENGINE_FLAGS = {"workspace_mb": "--workspace", "dla_core": "--dla"}


def engine_flag_name(key: str) -> str:
    return ENGINE_FLAGS.get(key, cli_name(key))


# The parity gates by bundle precision: the one table. export/parity_report.py makes Tolerances of it, the export's
# own graph check uses fp32's min cosine, and the parity flags' help and docs/EXPORT.md's table are rendered
# from it (tests/test_options.py). The numbers and why: docs/EXPORT.md, "Parity".
PARITY_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.9999, "max_task_drop": 0.5},
    "fp16": {"min_cosine": 0.999, "max_task_drop": 1.0},
    "int8": {"min_cosine": 0.99, "min_agreement": 0.97, "max_task_drop": 2.0},
    "int8-dynamic": {"min_cosine": 0.99, "min_agreement": 0.97, "max_task_drop": 2.0},
    "fp8": {"min_cosine": 0.99, "min_agreement": 0.97, "max_task_drop": 2.0},  # the same gates as int8
}
AGREEMENT_MARGIN = 0.01  # cosine gap: agreement counts queries whose top-1 beats the runner-up by more


def tolerance_defaults(key: str) -> str:
    """A tolerance's defaults by precision, for help texts: 'fp32 0.9999, fp16 0.999, int8/int8-dynamic/fp8 0.99'."""
    by_value: dict[str, list[str]] = {}
    for precision, gates in PARITY_TOLERANCES.items():
        value = gates.get(key)
        by_value.setdefault("not checked" if value is None else f"{value:g}", []).append(precision)
    return ", ".join(f"{'/'.join(ps)} {v}" for v, ps in by_value.items())


def parity_table() -> str:
    """docs/EXPORT.md's table of the checks, rendered from PARITY_TOLERANCES (precisions with equal gates
    share a row)."""
    rows: dict[tuple, list[str]] = {}
    for precision, gates in PARITY_TOLERANCES.items():
        key = (gates["min_cosine"], gates.get("max_task_drop"), gates.get("min_agreement"))
        rows.setdefault(key, []).append(precision)
    lines = [
        "| precision | min cosine (each row, each tower) | task checks: may lose (points) "
        "| agreement on confident queries |",
        "|---|---|---|---|",
    ]
    for (cos, drop, agree), precisions in rows.items():
        agreement = "not checked" if agree is None else f"{agree:g}"
        lines.append(f"| {', '.join(precisions)} | {cos:g} | {drop:g} | {agreement} |")
    return "\n".join(lines)


@dataclass
class ParityOptions:
    """How a bundle is checked against PyTorch: the tolerances (None: the bundle precision's gate in
    PARITY_TOLERANCES) and how its artifacts run. What is checked, on which data and how many pairs, is per
    call (``parity BUNDLE --data --count``; a recipe's ``export.parity_data`` / ``parity_count``)."""

    min_cosine: Annotated[float, Range(-1, 1)] | None = None  # per tower, every row: a cosine similarity
    # top-1 agreement with PyTorch on confident queries, a fraction (not percent)
    min_agreement: Annotated[float, Range(0, 1)] | None = None
    max_abs: Annotated[float, Range(0, None)] | None = None  # largest absolute difference allowed (off by default)
    # points of R@1 / zero-shot top-1 an artifact may significantly lose
    max_task_drop: Annotated[float, Range(0, 100)] | None = None
    # agreement counts queries whose reference top-1 beats the runner-up by more than this cosine gap
    agreement_margin: Annotated[float, Range(0, 2)] | None = None
    batch_size: Annotated[int, Range(1, None)] = 32  # pairs per call
    device: str = "cpu"  # ONNX Runtime device: cpu | cuda | tensorrt
    provider: str | None = None  # an ONNX Runtime execution provider; overrides device

    def validate_fields(self, path: str) -> None:
        """One clear error per value outside its domain, in the caller's words (the CLI's --min-cosine at the
        top level, a recipe's export.parity_options.min_cosine); agreement given in percent gets a hint. The
        field types hold the same domains (for files and the recipe table); `parity` runs this first, so its
        messages say what a flag means."""

        def name(key: str) -> str:
            return f"{path}.{key}" if path else cli_name(key)

        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise UserError(f"{name('min_cosine')} must be a cosine similarity in [-1, 1], got {self.min_cosine:g}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            pct = 1 < self.min_agreement <= 100
            hint = f" (write {self.min_agreement / 100:g} for {self.min_agreement:g}%)" if pct else ""
            raise UserError(f"{name('min_agreement')} must be a fraction in [0, 1]{hint}, got {self.min_agreement:g}")
        if self.max_abs is not None and not (self.max_abs >= 0 and math.isfinite(self.max_abs)):
            raise UserError(f"{name('max_abs')} must be a finite number >= 0, got {self.max_abs:g}")
        if self.max_task_drop is not None and not 0.0 <= self.max_task_drop <= 100.0:
            raise UserError(f"{name('max_task_drop')} is in accuracy points, from 0 to 100, got {self.max_task_drop:g}")
        if self.agreement_margin is not None and not 0.0 <= self.agreement_margin <= 2.0:
            raise UserError(
                f"{name('agreement_margin')} is a cosine-similarity gap in [0, 2], got {self.agreement_margin:g}"
            )
        if self.batch_size < 1:
            raise UserError(f"{name('batch_size')} must be positive, got {self.batch_size}")

    def tolerance_overrides(self) -> dict[str, float]:
        """The tolerances this asks for instead of the precision's defaults."""
        keys = ("min_cosine", "min_agreement", "max_abs", "max_task_drop", "agreement_margin")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


OptionsT = TypeVar("OptionsT")


def cli_name(key: str) -> str:
    """How the CLI spells a field in messages: calib_count -> --calib-count."""
    return "--" + key.replace("_", "-")


def resolve_options(
    cls: type[OptionsT],
    options: Any,
    overrides: dict[str, Any],
    label: str = "option",
    key_format: Callable[[str], str] | None = None,
) -> OptionsT:
    """``options`` (an instance of ``cls`` or a subclass, or None for the defaults) with keyword ``overrides``
    applied, validated against ``cls``: the one door of the Python API. Unknown keywords are errors."""
    base = cls() if options is None else options
    if not isinstance(base, cls):
        raise UserError(f"options must be a {cls.__name__}, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    data = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(f"unexpected keyword argument '{key}' (not a field of {cls.__name__})")
        data[key] = value
    return validate(cls(**data), cls, label, key_format)
