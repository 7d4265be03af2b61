"""TensorRT engines from an export bundle's ONNX graphs (TensorRT proper, else TensorRT for RTX).

Engines are specific to the GPU and library version that built them, so a bundle ships ONNX and the
engine is built where it runs (on the Jetson itself). Each engine gets a JSON sidecar holding everything
a runtime needs to open it alone (I/O names and dtypes, profile, preprocessing, tokenizer) and the build's
flags; the bundle manifest lists the engines.

Precision rules (``_plan``, decided from ``trt_caps.probe`` of the loaded library; docs/ENGINES.md has the table):
- An engine of the bundle's own precision is built from a STRONGLY TYPED network wherever the library has
  them (TensorRT-RTX, TensorRT >= 9): every tensor keeps the type the ONNX graph gives it, so the LayerNorm,
  softmax and reductions an fp16, int8 or fp8 Q/DQ bundle keeps in fp32 stay fp32. A weakly typed network
  with the FP16 flag lets TensorRT pick fp16 for them when that is faster.
- Changing precision at build time (fp16 from an fp32 bundle with the FP16 flag; implicit int8 from an fp32
  bundle with an entropy calibrator over real images/captions, ``calib``) needs the weak-typing API, which
  TensorRT 8.6-10.x have and TensorRT 11 and RTX do not: there, int8 and fp8 engines come only from Q/DQ
  bundles, whose calibration is our own export's.
- DLA builds are weakly typed on 8.6-10.x (DLA takes the precision flags) and strongly typed on 11.4.1+;
  RTX and TensorRT 11.0-11.4.0 have no DLA.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..common.errors import UserError
from ..common.formats.bundle import BundleManifest, EngineEntry
from ..common.formats.engine import ENGINE_FORMAT, ENGINE_VERSION, SIDECAR_SUFFIX, EngineSidecar
from ..common.integrity import check_onnx_external_data, sha256_file
from ..common.io import atomic_path, atomic_write_bytes
from ..common.options import EngineOptions, engine_flag_name, resolve_options
from ..common.vocab import ENGINE_PRECISIONS, TOWERS
from ..runtimes.trtlib import TrtLib, dtype_name, load_tensorrt
from .trt_caps import TrtCaps, probe

MAX_ELEMENTS = (1 << 31) - 1  # TensorRT's limit on one tensor's volume


@dataclass
class _Plan:
    """How one precision request is built with the library at hand."""

    precision: str
    mode: str  # strongly-typed | fp32 | fp16-flag | explicit-int8 | explicit-fp8 | calibrated-int8
    flags: list[str] = field(default_factory=list)
    strongly_typed: bool = False  # network created with NetworkDefinitionCreationFlag.STRONGLY_TYPED


def build_engines(
    bundle_dir: str | Path,
    options: EngineOptions | None = None,
    *,
    precision: str | None = None,
    towers: tuple[str, ...] = TOWERS,
    verbose: bool = True,
    manifest: BundleManifest | None = None,
    **fields: Any,
) -> list[dict]:
    """Build ``<tower>.engine`` + ``<tower>.engine.json`` in the bundle for each tower; return their sidecars.

    ``options`` (an ``EngineOptions``; its fields may also be given as keywords, ``batch_profile=(1, 8, 32)``) say
    how: the profile, workspace, DLA core, timing cache and, for implicit int8 from an fp32 bundle (TensorRT
    proper), the calibration. ``precision`` defaults to the bundle's. ``manifest``: the bundle's, when the caller
    has read (and verified) it already. ``batch=`` is the old name of ``batch_profile`` (deprecated).
    """
    if "batch" in fields:
        warnings.warn("build_engines(batch=...) is deprecated; use batch_profile=", DeprecationWarning, stacklevel=2)
        fields["batch_profile"] = fields.pop("batch")
    opts = resolve_options(EngineOptions, options, fields, key_format=engine_flag_name)
    bundle = Path(bundle_dir)
    manifest = manifest or BundleManifest.read(bundle)
    _check_towers(towers, manifest, bundle)
    _check_workspace(opts.workspace_mb)
    lib = load_tensorrt()
    caps = probe(lib)
    plan = _plan(caps, manifest.precision, precision, opts.dla_core, opts.calib)  # every refusal before any build
    job = _Job(lib, caps, bundle, manifest, plan, opts, _timing_cache(opts.timing_cache, lib))
    lo, _, hi = opts.profile
    if opts.dla_core is not None and lo != hi and verbose:
        print(
            "note: DLA runs static shapes only; with a dynamic batch range most layers fall back to the GPU. "
            "Build DLA engines with one batch size, e.g. --batch-profile 1,1,1"
        )
    entries = []
    for tower in towers:
        entry = job.build(tower)
        entries.append(entry)
        if verbose:
            print(
                f"{tower}: {entry['engine']} ({entry['size_bytes'] / 2**20:.1f} MiB, {entry['build_seconds']:.1f} s)"
                f"\n  equivalent command: {entry['trtexec']}"
            )
    if job.cache is not None:
        job.cache.save()
    _record_in_manifest(bundle, manifest, entries)
    return entries


def check_buildable(options: EngineOptions, bundle_precisions: list[str]) -> None:
    """Refuse now what ``build_engines`` would refuse for bundles of these precisions with this TensorRT (a DLA
    on a library without one, fp8 on one without FP8 Q/DQ ...): a run checks its ``engines:`` section before it
    compresses, not after hours of training."""
    _check_workspace(options.workspace_mb)
    caps = probe(load_tensorrt())
    for precision in bundle_precisions:
        try:
            _plan(caps, precision, None, options.dla_core, options.calib)
        except UserError as e:  # its words are the CLI's (--dla ...): say which section and bundles it is about
            raise UserError(f"engines: for the {precision} bundles: {e}") from None


def engines_up_to_date(bundle_dir: str | Path, options: EngineOptions, manifest: BundleManifest) -> list[dict] | None:
    """The sidecars of the bundle's engines when both towers have one in the bundle's precision, built with
    ``options``' profile, workspace and DLA core by the TensorRT loaded here (so a resumed run skips them);
    else None. `manifest`: the bundle's, read (and verified) by the caller; each engine is checked against its
    recorded digest."""
    bundle = Path(bundle_dir)
    lib = load_tensorrt()
    sidecars = []
    for tower in TOWERS:
        entry = manifest.engines.get(tower)
        if entry is None or entry.precision != manifest.precision or entry.library_version != lib.version:
            return None
        found = EngineSidecar.read(bundle / entry.file)
        if found is None:
            return None
        p, flags = found.profile, found.flags  # flags: free-form
        built = ((p.min, p.opt, p.max), flags.get("workspace_mb"), flags.get("dla_core"))
        if built != (options.profile, options.workspace_mb, options.dla_core):
            return None
        sidecars.append(found.to_dict())
    return sidecars


def _timing_cache(path: str | None, lib: TrtLib) -> _TimingCache | None:
    if path is not None and lib.is_rtx:
        print(
            "note: TensorRT for RTX ignores timing caches (it compiles kernels just in time on the GPU, "
            "with its own runtime cache); --timing-cache is not used"
        )
        return None
    return _TimingCache(Path(path)) if path else None


# ---------------------------------------------------------------------------------------------- checks
def _physical_memory_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def _check_workspace(workspace_mb: int | None) -> None:
    """This machine's side of --workspace (EngineOptions checked that it is a positive number)."""
    if workspace_mb is None:
        return
    total = _physical_memory_mb()
    if total is not None and workspace_mb > total:
        raise UserError(
            f"--workspace {workspace_mb} MiB is more than this machine's {total} MiB of memory; "
            "pass a smaller limit (or none: the builder then uses what the device has)"
        )


def _check_volume(tower: str, name: str, shape: list[int]) -> None:
    volume = 1
    for d in shape:
        volume *= d
    if volume > MAX_ELEMENTS:
        raise UserError(
            f"{tower} graph: input {name} at the largest batch would be {'x'.join(map(str, shape))} = "
            f"{volume} elements, above TensorRT's limit of {MAX_ELEMENTS}; lower the max of --batch-profile"
        )


def _check_towers(towers: tuple[str, ...], manifest: BundleManifest, bundle: Path) -> None:
    if not towers:
        raise UserError("no towers to build; pass image, text or both")
    for t in towers:
        if t not in TOWERS:
            raise UserError(f"unknown tower {t!r}; choose image or text")
        manifest.tower_path(bundle, t)


def _plan(
    caps: TrtCaps, bundle_precision: str, requested: str | None, dla_core: int | None, calib: str | None
) -> _Plan:
    """How to build `requested` (default: the bundle's precision) with this library, or one line saying what to
    do instead: every refusal happens here, before anything is parsed or built."""
    if bundle_precision.startswith("int8") and bundle_precision != "int8":
        raise UserError(
            f"this bundle is {bundle_precision} (dynamic int8, for ONNX Runtime on CPU); TensorRT "
            "needs static QDQ int8: export with --precision int8"
        )
    want = requested or bundle_precision
    if want not in ENGINE_PRECISIONS:
        raise UserError(f"unknown precision {want!r}; choose one of {', '.join(ENGINE_PRECISIONS)}")
    if "fp8" in (want, bundle_precision) and want != bundle_precision:
        raise UserError(
            f"an fp8 engine needs an fp8 Q/DQ bundle and an fp8 bundle builds only fp8 engines; export a bundle "
            f"with --precision {want}{' --calib DATA' if want in ('fp8', 'int8') else ''} and build from that"
        )
    if want == "fp8" and not caps.fp8:
        missing = "DataType.FP8" if not caps.fp8_type else "strongly typed networks"
        raise UserError(
            f"{caps.label} cannot build FP8 Q/DQ graphs (no {missing}): use TensorRT 10 or newer (or TensorRT "
            "for RTX), or export a bundle with --precision int8 --calib DATA"
        )
    plan = _dla_plan(caps, bundle_precision, want, calib) if dla_core is not None else None
    if plan is None:
        plan = _gpu_plan(caps, bundle_precision, want, calib)
    if calib is not None and plan.mode != "calibrated-int8":
        raise UserError(
            f"--calib is only for implicit int8 from an fp32 bundle on a TensorRT with calibrators, and this "
            f"{plan.precision} engine from a {bundle_precision} bundle uses none: drop --calib"
        )
    return plan


def _gpu_plan(caps: TrtCaps, bundle_precision: str, want: str, calib: str | None) -> _Plan:
    if want == bundle_precision:
        if caps.strongly_typed:  # the engine computes in the graph's own types
            return _Plan(want, _EXPLICIT.get(want, "strongly-typed"), [], strongly_typed=True)
        if want == "fp32":
            return _Plan(want, "fp32")
        return _Plan(want, _EXPLICIT.get(want, "fp16-flag"), _weak_flags(caps, want))
    if bundle_precision != "fp32":
        raise UserError(
            f"cannot build a {want} engine from this {bundle_precision} bundle; export a bundle with "
            f"--precision {want}{' (or fp32)' if caps.weakly_typed else ''} and build from that"
        )
    if want == "fp16":
        if not caps.weakly_typed:
            raise UserError(
                f"{caps.label} builds strongly typed networks only (no BuilderFlag.FP16): the engine has the "
                "ONNX graph's precision (fp32 here); export a bundle with --precision fp16 and build from that"
            )
        return _Plan(want, "fp16-flag", ["FP16"])
    if not caps.calibrators:  # want == "int8"
        raise UserError(
            f"{caps.label} has no int8 calibration (implicit int8 is gone from TensorRT 11 and RTX): export an "
            "int8 Q/DQ bundle with --precision int8 --calib DATA and build from that"
        )
    if calib is None:
        raise UserError(
            "an int8 engine from an fp32 bundle needs calibration data (--calib scenes:calib or a "
            "CSV/COCO source), or export an int8 QDQ bundle with --precision int8"
        )
    return _Plan(want, "calibrated-int8", _weak_flags(caps, "int8"))


def _dla_plan(caps: TrtCaps, bundle_precision: str, want: str, calib: str | None) -> _Plan:
    if not caps.dla:
        raise UserError(caps.dla_refusal())
    if want not in ("fp16", "int8"):
        raise UserError(
            f"DLA runs fp16 or int8 only, not {want}: pass --precision fp16 (or use an fp16 or int8 bundle) with --dla"
        )
    if caps.weakly_typed:  # TensorRT 8.6 / 10.x: DLA builds take the precision flags
        if want == bundle_precision:
            return _Plan(want, _EXPLICIT.get(want, "fp16-flag"), _weak_flags(caps, want))
        return _gpu_plan(caps, bundle_precision, want, calib)  # fp32 bundle: the FP16 flag or calibrated int8
    if want != bundle_precision:  # TensorRT 11.4.1+: DLA networks are strongly typed too
        raise UserError(
            f"{caps.label} builds DLA engines strongly typed, in the bundle's own precision ({bundle_precision}); "
            f"export a bundle with --precision {want}{' --calib DATA' if want == 'int8' else ''} for --dla"
        )
    return _Plan(want, _EXPLICIT.get(want, "strongly-typed"), [], strongly_typed=True)


_EXPLICIT = {"int8": "explicit-int8", "fp8": "explicit-fp8"}


def _weak_flags(caps: TrtCaps, precision: str) -> list[str]:
    """Builder flags of a weakly typed build; int8 keeps FP16 on so unquantized layers need not run in fp32."""
    want = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    return [f for f in want if f in caps.precision_flags]


# ---------------------------------------------------------------------------------------------- building
@dataclass
class _Job:
    """The options shared by every tower's build in one `build_engines` call."""

    lib: TrtLib
    caps: TrtCaps
    bundle: Path
    manifest: BundleManifest
    plan: _Plan
    options: EngineOptions
    cache: _TimingCache | None
    calibrator: Any = field(default=None, init=False)  # the current tower's, when calibrating

    @property
    def batch(self) -> tuple[int, int, int]:
        return self.options.profile

    @property
    def workspace_mb(self) -> int | None:
        return self.options.workspace_mb

    @property
    def dla_core(self) -> int | None:
        return self.options.dla_core

    @property
    def calib_cache(self) -> Path | None:
        return Path(self.options.calib_cache) if self.options.calib_cache else None

    def build(self, tower: str) -> dict[str, Any]:
        onnx_path = self.manifest.tower_path(self.bundle, tower)
        logger = self.lib.logger("ERROR")
        builder, network, parser = self._parse(onnx_path, logger)
        inputs, outputs = _io(network), _io(network, outputs=True)
        config = self._config(builder, tower, inputs)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        failed_callback = getattr(self.calibrator, "error", None)
        if failed_callback is not None:  # raised inside TensorRT's calibration callback, kept for us
            raise UserError(f"int8 calibration of the {tower} tower failed: {failed_callback}")
        if self.cache is not None and serialized is not None:
            self.cache.update(config)
        del parser  # the parser owns the weights the network points at: keep it alive until here
        if serialized is None:
            oom = " (out of memory? lower --workspace or add swap)" if _looks_like_oom(logger) else ""
            raise UserError(
                f"{self.lib.name} failed to build an engine from {onnx_path.name}: "
                f"{'; '.join(logger.errors[-5:]) or 'no reason given'}{oom}"
            )
        data = bytes(serialized)
        entry = self._sidecar(tower, inputs, outputs, onnx_path, data, seconds)
        sidecar = EngineSidecar.from_data(entry)  # validated before anything is written
        with atomic_path(self.bundle / entry["engine"]) as tmp:
            tmp.write_bytes(data)
        sidecar.write(self.bundle / entry["engine"])
        return entry

    def _parse(self, onnx_path: Path, logger: Any) -> tuple[Any, Any, Any]:
        trt = self.lib.module
        builder = trt.Builder(logger)
        flags = 0
        if self.caps.explicit_batch_flag:  # TensorRT 8.x needs it; 10.x ignores it; 11.x removed it
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if self.plan.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        check_onnx_external_data(onnx_path, self.bundle)  # the parser follows external-data paths anywhere
        if not parser.parse_from_file(str(onnx_path)):
            raise UserError(f"{self.lib.name} cannot parse {onnx_path}: {_parser_errors(parser, logger)}")
        if network.num_inputs == 0 or network.num_outputs == 0:  # junk bytes can decode as an empty protobuf
            raise UserError(
                f"{self.lib.name} cannot parse {onnx_path}: it holds no graph inputs/outputs; the file is "
                "corrupt or not ONNX, re-export the bundle"
            )
        return builder, network, parser

    def _config(self, builder: Any, tower: str, inputs: list[dict]) -> Any:
        trt = self.lib.module
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for t in inputs:
            fixed = t["shape"][1:]
            if any(d < 0 for d in fixed):
                raise UserError(
                    f"{tower} graph: input {t['name']} has dynamic dimensions besides the batch "
                    f"({t['shape']}); re-export with a fixed image size / context length"
                )
            _check_volume(tower, t["name"], [self.batch[2], *fixed])
            profile.set_shape(t["name"], *[(b, *fixed) for b in self.batch])
        config.add_optimization_profile(profile)
        if self.workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_mb) << 20)
        for name in self.plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        if self.dla_core is not None:
            _use_dla(self.lib, builder, config, self.dla_core)
        if self.cache is not None:
            self.cache.attach(config)
        if self.plan.mode == "calibrated-int8":
            from .calibrator import make_calibrator

            # the data is read and checked here: an error raised inside TensorRT's callback would not reach us
            self.calibrator = make_calibrator(
                self.lib,
                tower,
                inputs[0],
                self.manifest,
                self.bundle,
                self.options.calib,
                self.options.calib_count,
                batch=self.batch[1],
                cache_file=self.calib_cache or self.bundle / f"{tower}.calib.cache",
            )
            config.int8_calibrator = self.calibrator
            config.set_calibration_profile(profile)
        return config

    def _sidecar(
        self, tower: str, inputs: list[dict], outputs: list[dict], onnx_path: Path, data: bytes, seconds: float
    ) -> dict[str, Any]:
        m, engine = self.manifest, f"{tower}.engine"
        return {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_VERSION,
            "tower": tower,
            "engine": engine,
            "library": self.lib.name,
            "library_version": self.lib.version,
            "precision": self.plan.precision,
            "build_mode": self.plan.mode,
            "profile": dict(zip(("min", "opt", "max"), self.batch)),
            "inputs": inputs,
            "outputs": outputs,
            "embed_dim": m.embed_dim,
            "normalized": m.normalized,
            "preprocess": m.to_dict()["preprocess"] if tower == "image" else None,
            "tokenizer": m.tokenizer if tower == "text" else None,
            "params": m.towers[tower].params or m.params.get(tower),
            "onnx": onnx_path.name,
            "onnx_sha256": sha256_file(onnx_path),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "build_seconds": round(seconds, 3),
            "flags": {
                "builder_flags": self.plan.flags,
                "strongly_typed": self.plan.strongly_typed,
                "network_flags": ["STRONGLY_TYPED"] if self.plan.strongly_typed else [],
                "workspace_mb": self.workspace_mb,
                "dla_core": self.dla_core,
                "gpu_fallback": self.dla_core is not None,
                "timing_cache": str(self.cache.path) if self.cache else None,
                "calibration": self.options.calib if self.plan.mode == "calibrated-int8" else None,
            },
            "trtexec": self.command(onnx_path.name, engine, inputs),
            "toolkit_version": __version__,
        }

    def command(self, onnx_name: str, engine_name: str, inputs: list[dict]) -> str:
        """The library's own command-line builder doing the same build (run it in the bundle directory)."""
        args = [self.lib.cli, f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
        for which, b in zip(("min", "opt", "max"), self.batch):
            args.append(
                f"--{which}Shapes="
                + ",".join(f"{t['name']}:" + "x".join(str(d) for d in (b, *t["shape"][1:])) for t in inputs)
            )
        if self.plan.strongly_typed and self.caps.cli_strongly_typed_flag:  # 11.x and RTX: always strongly typed
            args.append("--stronglyTyped")
        args += [f"--{f.lower()}" for f in self.plan.flags]
        if self.plan.mode == "calibrated-int8":
            args.append(f"--calib={self.calib_cache or Path(engine_name).stem + '.calib.cache'}")
        if self.workspace_mb is not None:
            args.append(f"--memPoolSize=workspace:{self.workspace_mb}")  # MiB
        if self.dla_core is not None:
            args += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        if self.cache is not None:
            args.append(f"--timingCacheFile={self.cache.path}")
        return shlex.join(args)


def _io(network: Any, outputs: bool = False) -> list[dict[str, Any]]:
    n = network.num_outputs if outputs else network.num_inputs
    get = network.get_output if outputs else network.get_input
    return [
        {"name": t.name, "dtype": dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
        for t in (get(i) for i in range(n))
    ]


def _parser_errors(parser: Any, logger: Any) -> str:
    msgs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = (
            f"node {e.node()} ({e.node_operator()}{' ' + e.node_name() if e.node_name() else ''})"
            if e.node() >= 0
            else "model"
        )
        msgs.append(f"{where}: {' '.join(e.desc().split())}")
    return "; ".join(msgs) or "; ".join(logger.errors[-3:]) or "unknown parser error"


def _use_dla(lib: TrtLib, builder: Any, config: Any, core: int) -> None:
    trt = lib.module
    cores = builder.num_DLA_cores
    if cores == 0:
        raise UserError(
            "this device has no DLA (only Jetson AGX Xavier/Orin and Xavier NX/Orin NX have one): drop --dla"
        )
    if not 0 <= core < cores:
        raise UserError(f"--dla {core} does not exist here; this device has DLA cores 0..{cores - 1}")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU


def _looks_like_oom(logger: Any) -> bool:
    return any("memory" in m.lower() or "oom" in m.lower() for m in logger.errors)


class _TimingCache:
    """A timing cache file carried from build to build (and run to run) on TensorRT proper.

    Each config gets a cache made from the latest bytes, and the bytes are taken back while that config is
    alive: the cache object's lifetime is tied to its config in some versions, and outliving it crashes.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes() if path.is_file() else b""

    def attach(self, config: Any) -> None:
        config.set_timing_cache(config.create_timing_cache(self.data), False)  # False: foreign caches are errors

    def update(self, config: Any) -> None:
        self.data = bytes(config.get_timing_cache().serialize())

    def save(self) -> None:
        atomic_write_bytes(self.path, self.data)


def _record_in_manifest(bundle: Path, manifest: BundleManifest, entries: list[dict]) -> None:
    """List the engines in the manifest and record their files' digests, so opening the bundle verifies them."""
    for e in entries:
        manifest.engines[e["tower"]] = EngineEntry(
            file=e["engine"],
            sidecar=e["engine"] + SIDECAR_SUFFIX,
            library=e["library"],
            library_version=e["library_version"],
            precision=e["precision"],
            profile=EngineSidecar.from_data(e).profile,
            size_bytes=e["size_bytes"],
        )
        manifest.record_file(bundle, e["engine"])
        manifest.record_file(bundle, e["engine"] + SIDECAR_SUFFIX)
        if (bundle / f"{e['tower']}.calib.cache").is_file():  # TensorRT's int8 calibration, written into the bundle
            manifest.record_file(bundle, f"{e['tower']}.calib.cache")
    manifest.write(bundle)
