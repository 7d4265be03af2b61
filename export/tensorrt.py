"""TensorRT engines from an export bundle's ONNX graphs (TensorRT proper, else TensorRT for RTX).

Engines are specific to the GPU and library version that built them, so a bundle ships ONNX and the
engine is built where it runs (on the Jetson itself). Each engine gets a JSON sidecar holding everything
a runtime needs to open it alone (I/O names and dtypes, profile, preprocessing, tokenizer) and the build's
flags; the bundle manifest lists the engines.

Precision rules (see ``_plan``):
- An engine of the bundle's own precision is built from a STRONGLY TYPED network wherever the library has
  them (TensorRT-RTX always; TensorRT >= 9): every tensor keeps the type the ONNX graph gives it, so the
  LayerNorm, softmax and reductions an fp16 or QDQ bundle keeps in fp32 stay fp32. A weakly typed network
  with the FP16 flag lets TensorRT pick fp16 for them when that is faster.
- TensorRT-RTX has no implicit int8 calibration and no DLA.
- TensorRT proper also builds fp16 from an fp32 bundle (builder flag, weakly typed: the only way to change
  precision) and implicit int8 from an fp32 bundle with an entropy calibrator over real images/captions
  (``calib``), caching the scales in a file. DLA builds are weakly typed too: DLA needs the precision flags.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..common.errors import UserError
from ..common.integrity import check_onnx_external_data, sha256_file
from ..common.io import atomic_path, atomic_write_bytes
from ..common.schemas import (
    ENGINE_FORMAT,
    ENGINE_VERSION,
    MAX_BATCH,
    SIDECAR_SUFFIX,
    BundleManifest,
    EngineEntry,
    EngineSidecar,
)
from ..runtimes.bundle import read_manifest, tower_file, write_manifest
from ..runtimes.trtlib import TrtLib, dtype_name, load_tensorrt

PRECISIONS = ("fp32", "fp16", "int8")
MAX_ELEMENTS = (1 << 31) - 1  # TensorRT's limit on one tensor's volume


@dataclass
class _Plan:
    """How one precision request is built with the library at hand."""

    precision: str
    mode: str  # strongly-typed | fp32 | fp16-flag | explicit-int8 | calibrated-int8
    flags: list[str] = field(default_factory=list)
    strongly_typed: bool = False  # network created with NetworkDefinitionCreationFlag.STRONGLY_TYPED


def build_engines(
    bundle_dir: str | Path,
    *,
    precision: str | None = None,
    batch: tuple[int, int, int] = (1, 8, 32),
    workspace_mb: int | None = None,
    dla_core: int | None = None,
    timing_cache: Path | None = None,
    towers: tuple[str, ...] = ("image", "text"),
    calib: str | None = None,
    calib_count: int = 256,
    calib_cache: Path | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Build ``<tower>.engine`` + ``<tower>.engine.json`` in the bundle for each tower; return their sidecars.

    ``calib``/``calib_count``/``calib_cache`` only matter for implicit int8 from an fp32 bundle (TensorRT proper).
    """
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    batch = _check_batch(batch)
    _check_towers(towers, manifest, bundle)
    _check_workspace(workspace_mb)
    lib = load_tensorrt()
    if timing_cache is not None and lib.is_rtx:
        print(
            "note: TensorRT for RTX ignores timing caches (it compiles kernels just in time on the GPU, "
            "with its own runtime cache); --timing-cache is not used"
        )
        timing_cache = None
    job = _Job(
        lib,
        bundle,
        manifest,
        _plan(lib, manifest.precision, precision, dla_core, calib),
        batch,
        workspace_mb,
        dla_core,
        _TimingCache(Path(timing_cache)) if timing_cache else None,
        calib,
        calib_count,
        Path(calib_cache) if calib_cache else None,
    )
    if dla_core is not None and batch[0] != batch[2] and verbose:
        print(
            "note: DLA runs static shapes only; with a dynamic batch range most layers fall back to the GPU. "
            "Build DLA engines with one batch size, e.g. --batch 1,1,1"
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


# ---------------------------------------------------------------------------------------------- checks
def _check_batch(batch: Any) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(b) for b in batch)
    except (TypeError, ValueError):
        raise UserError(f"--batch needs three integers min,opt,max (e.g. 1,8,32), got {batch!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"--batch must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")
    if hi > MAX_BATCH:
        raise UserError(
            f"--batch max {hi} is above the limit of {MAX_BATCH}; engines for edge devices use batches "
            "of a few dozen at most (e.g. --batch 1,8,32)"
        )
    return lo, opt, hi


def _physical_memory_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def _check_workspace(workspace_mb: Any) -> None:
    if workspace_mb is None:
        return
    if isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int) or workspace_mb <= 0:
        raise UserError(f"--workspace must be a positive number of MiB, got {workspace_mb}")
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
            f"{volume} elements, above TensorRT's limit of {MAX_ELEMENTS}; lower the max of --batch"
        )


def _check_towers(towers: tuple[str, ...], manifest: BundleManifest, bundle: Path) -> None:
    if not towers:
        raise UserError("no towers to build; pass image, text or both")
    for t in towers:
        if t not in ("image", "text"):
            raise UserError(f"unknown tower {t!r}; choose image or text")
        tower_file(bundle, manifest, t)


def has_strong_typing(lib: TrtLib) -> bool:
    """Whether the library can create strongly typed networks (TensorRT-RTX always; TensorRT from 9.0)."""
    flags = getattr(lib.module, "NetworkDefinitionCreationFlag", None)
    return lib.is_rtx or hasattr(flags, "STRONGLY_TYPED")


def _plan(lib: TrtLib, bundle_precision: str, requested: str | None, dla_core: int | None, calib: str | None) -> _Plan:
    if bundle_precision.startswith("int8") and bundle_precision != "int8":
        raise UserError(
            f"this bundle is {bundle_precision} (dynamic int8, for ONNX Runtime on CPU); TensorRT "
            "needs static QDQ int8: export with --precision int8"
        )
    want = requested or bundle_precision
    if want not in PRECISIONS:
        raise UserError(f"unknown precision {want!r}; choose one of {', '.join(PRECISIONS)}")
    if dla_core is not None:
        if lib.is_rtx:
            raise UserError("DLA needs TensorRT proper (JetPack on a Jetson); TensorRT for RTX has no DLA: drop --dla")
        if want == "fp32":
            raise UserError("DLA runs fp16 or int8 only: pass --precision fp16 (or use an int8 bundle) with --dla")
    if want == bundle_precision:
        if has_strong_typing(lib) and dla_core is None:  # the engine computes in the graph's own types
            return _Plan(want, "explicit-int8" if want == "int8" else "strongly-typed", [], strongly_typed=True)
        if want == "fp32":
            return _Plan(want, "fp32")
        if want == "int8":
            return _Plan(want, "explicit-int8", ["INT8", "FP16"])
        return _Plan(want, "fp16-flag", ["FP16"])
    if bundle_precision == "fp32" and not lib.is_rtx:
        if want == "fp16":
            return _Plan(want, "fp16-flag", ["FP16"])
        if calib is None:
            raise UserError(
                "an int8 engine from an fp32 bundle needs calibration data (--calib scenes:calib or a "
                "CSV/COCO source), or export an int8 QDQ bundle with --precision int8"
            )
        return _Plan(want, "calibrated-int8", ["INT8", "FP16"])
    if lib.is_rtx and bundle_precision == "fp32":
        why = " and has no int8 calibration" if want == "int8" else ""
        raise UserError(
            f"TensorRT for RTX builds strongly typed networks: the engine has the ONNX graph's precision "
            f"(fp32 here){why}; export a bundle with --precision {want} and build from that"
        )
    raise UserError(
        f"cannot build a {want} engine from this {bundle_precision} bundle; export a bundle with "
        f"--precision {want} (or fp32) and build from that"
    )


# ---------------------------------------------------------------------------------------------- building
@dataclass
class _Job:
    """The options shared by every tower's build in one `build_engines` call."""

    lib: TrtLib
    bundle: Path
    manifest: BundleManifest
    plan: _Plan
    batch: tuple[int, int, int]
    workspace_mb: int | None
    dla_core: int | None
    cache: _TimingCache | None
    calib: str | None
    calib_count: int
    calib_cache: Path | None
    calibrator: Any = field(default=None, init=False)  # the current tower's, when calibrating

    def build(self, tower: str) -> dict[str, Any]:
        onnx_path = tower_file(self.bundle, self.manifest, tower)
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
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x needs it; 10.x ignores it
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
                self.calib,
                self.calib_count,
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
                "calibration": self.calib if self.plan.mode == "calibrated-int8" else None,
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
        if self.plan.strongly_typed and not self.lib.is_rtx:  # TensorRT-RTX networks are always strongly typed
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
    write_manifest(bundle, manifest)
