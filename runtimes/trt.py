"""The `trt` backend: TensorRT engines (`tensorrt` or `tensorrt_rtx`) with torch CUDA buffers.

Opens one ``.engine``/``.plan`` (its ``.json`` sidecar gives the tower, preprocessing and tokenizer) or every
engine a bundle's manifest lists. Inputs are cast to the engine's input dtype (int32 tokens, fp16 images for
fp16 engines), the batch shape is set on the optimization profile, and the engine runs asynchronously on a
CUDA stream the runtime owns (enqueueing on the legacy default stream makes TensorRT add synchronisations);
events order it after the caller's stream and the caller's stream after it, so torch ops before and after (and
CUDA-event timers) see its work. fp16 outputs become fp32. An engine built for a DLA core (``flags.dla_core``
in its sidecar) runs on that core.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.formats.bundle import BundleManifest, is_bundle
from ..common.formats.engine import ENGINE_SUFFIXES, EngineSidecar
from ..common.vocab import TOWERS
from .artifacts import bundle_engines, read_sidecar
from .base import InputSpec, Runtime, register_backend
from .trtlib import TrtLib, dtype_name, load_tensorrt

_TOWER_OF_INPUT = {"images": "image", "tokens": "text"}


def dla_core_of(sidecar: EngineSidecar | dict[str, Any] | None) -> int | None:
    """The DLA core an engine was built for (its sidecar's ``flags.dla_core``), or None for the GPU."""
    flags = sidecar.get("flags") if isinstance(sidecar, dict) else getattr(sidecar, "flags", None)
    core = (flags or {}).get("dla_core")
    return None if core is None else int(core)


def engine_runtime(lib: TrtLib, logger: Any, dla_core: int | None) -> Any:
    """A TensorRT runtime set to the DLA core the engine was built for: the core is chosen at build time but only
    takes effect when the runtime that deserializes the engine is told it (else TensorRT uses core 0 or fails)."""
    runtime = lib.module.Runtime(logger)
    if dla_core is None:
        return runtime
    cores = 0 if lib.is_rtx else int(getattr(runtime, "num_DLA_cores", 0))
    if cores == 0:
        raise UserError(
            f"this engine was built for DLA core {dla_core}, but {lib.name} here has no DLA (only Jetson "
            "AGX Xavier/Orin and Xavier NX/Orin NX have one): run it on that device, or rebuild without "
            "--dla"
        )
    if not 0 <= dla_core < cores:
        raise UserError(
            f"this engine was built for DLA core {dla_core}; this device has DLA cores 0..{cores - 1}: "
            "rebuild it with --dla set to one of those"
        )
    runtime.DLA_core = dla_core
    return runtime


class _Engine:
    """One deserialized engine, its execution context, its own CUDA stream, and its input and output names."""

    def __init__(self, lib: TrtLib, path: Path, device: Any, dla_core: int | None = None):
        import torch

        self.path, self.device = path, device
        self.logger = lib.logger("ERROR")
        trt = lib.module
        self.runtime = engine_runtime(lib, self.logger, dla_core)
        self.stream = torch.cuda.Stream(device)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(
                f"{lib.name} {lib.version} cannot open {path}: {'; '.join(self.logger.errors[-2:])}. "
                "An engine only runs with the library version and GPU family that built it: rebuild it "
                "on this device from the ONNX bundle (`tinyclip-edge export BUNDLE --format engine`)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise UserError(
                f"{path} has inputs {inputs} and outputs {outputs}; expected one CLIP tower "
                "(images or tokens -> embeddings)"
            )
        self.input = inputs[0]
        self.output = "embeddings" if "embeddings" in outputs else outputs[0]
        self.in_dtype = getattr(torch, dtype_name(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = getattr(torch, dtype_name(self.engine.get_tensor_dtype(self.output)))
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.shape = [int(d) for d in self.engine.get_tensor_shape(self.input)]
        self.embed_dim = int(self.engine.get_tensor_shape(self.output)[-1])
        self._set_shape: tuple[int, ...] | None = None

    @property
    def device_memory_bytes(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def run(self, x: Any) -> Any:
        import torch

        x = torch.as_tensor(x).to(self.device, self.in_dtype).contiguous()
        if tuple(x.shape) != self._set_shape:
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise UserError(f"{self.path.name}: input shape {list(x.shape)} is outside the engine's profile")
            self._set_shape = tuple(x.shape)
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=self.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, y.data_ptr())
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # x was written on the caller's stream
        x.record_stream(self.stream)  # the allocator must not reuse x / y while our stream uses them
        y.record_stream(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError(f"{self.path.name}: TensorRT execution failed: {'; '.join(self.logger.errors[-2:])}")
        caller.wait_stream(self.stream)  # work the caller queues next (y.float(), timers) follows ours
        return y.float()


class TrtRuntime(Runtime):
    backend = "trt"

    def __init__(
        self,
        engines: dict[str, _Engine],
        sidecars: dict[str, EngineSidecar | None],
        *,
        name: str,
        device: str,
        base_dir: Path,
        lib: TrtLib,
    ):
        first = next((s for s in sidecars.values() if s is not None), None)
        image_side, text_side = sidecars.get("image"), sidecars.get("text")
        image, text = engines.get("image"), engines.get("text")
        spec = InputSpec(
            image_size=image.shape[-1] if image else 0,
            context_length=text.shape[-1] if text else 0,
            embed_dim=next(iter(engines.values())).embed_dim,
            image_dtype=_dtype_str(image.in_dtype) if image else "float32",
            token_dtype="int32",
            min_batch=max(e.batch_range[0] for e in engines.values()),
            max_batch=min(e.batch_range[1] for e in engines.values()),
        )
        super().__init__(
            name=name,
            device=device,
            precision=first.precision if first else "unknown",
            spec=spec,
            preprocess=image_side.to_dict()["preprocess"] if image_side else None,
            tokenizer=text_side.tokenizer if text_side else None,
            base_dir=base_dir,
            towers=tuple(t for t in TOWERS if t in engines),
        )
        self._engines, self._sidecars, self._lib = engines, sidecars, lib

    def _encode_image(self, images: Any) -> Any:
        return self._engines["image"].run(images)

    def _encode_text(self, tokens: Any) -> Any:
        return self._engines["text"].run(tokens)

    def close(self) -> None:
        self._engines = {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "library": self._lib.name,
            "library_version": self._lib.version,
            "engines": {t: str(e.path) for t, e in self._engines.items()},
            "dla_core": {
                t: int(e.runtime.DLA_core)
                for t, e in self._engines.items()
                if int(getattr(e.runtime, "DLA_core", -1)) >= 0
            }
            or None,
            "profile": {t: list(e.batch_range) for t, e in self._engines.items()},
            "device_memory_bytes": sum(e.device_memory_bytes for e in self._engines.values()),
        }


def _dtype_str(torch_dtype: Any) -> str:
    return str(torch_dtype).replace("torch.", "")


def engine_files(
    target: str | os.PathLike, tower: str | None = None, manifest: BundleManifest | None = None
) -> dict[str, tuple[Path, EngineSidecar | None]]:
    """tower -> (engine path, sidecar or None) for an engine file or a bundle with engines (`manifest`: the
    bundle's, when the caller has read it already)."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"engine not found: {path}")
    if path.suffix in ENGINE_SUFFIXES:
        side = read_sidecar(path)
        t = side.tower if side else tower or "unknown"
        found = {t: (path, side)}
    elif is_bundle(path):
        manifest = manifest or BundleManifest.read(path)
        engines = bundle_engines(path, manifest)
        found = {t: (manifest.engine_path(path, t), read_sidecar(manifest.engine_path(path, t))) for t in engines}
    else:
        raise UserError(f"{path} is neither a TensorRT engine (.engine/.plan) nor a bundle with engines")
    if tower is None or "unknown" in found:
        return found
    if tower not in found:
        raise UserError(f"{path} has no {tower} engine (it holds: {', '.join(found)})")
    return {tower: found[tower]}


@register_backend("trt")
def open_trt(
    target: Any,
    *,
    device: str = "cuda",
    precision: str | None = None,
    tower: str | None = None,
    manifest: BundleManifest | None = None,
    **options: Any,
) -> TrtRuntime:
    if options:
        raise UserError(
            f"the trt backend takes no options {sorted(options)}; precision and batch range are "
            "fixed when the engine is built"
        )
    files = engine_files(target, tower, manifest)
    sidecars = {t: s for t, (_, s) in files.items() if s}
    built = {s.precision for s in sidecars.values()}
    if precision is not None and built and precision not in built:
        raise UserError(
            f"{target} was built as {'/'.join(sorted(built))}; an engine's precision is fixed at build "
            f"time: build another engine from a {precision} bundle"
        )
    libs = {s.library for s in sidecars.values()}
    if len(libs) > 1:
        raise UserError(f"{target} mixes engines built with {sorted(libs)}; rebuild them with one library")
    lib = load_tensorrt(prefer=next(iter(libs)) if libs else None)
    if not str(device).startswith("cuda"):
        raise UserError("TensorRT engines run on a CUDA GPU: pass device='cuda' (--device cuda)")
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines need one")
    dev = torch.device(device)
    engines: dict[str, _Engine] = {}
    for t, (path, side) in files.items():
        eng = _Engine(lib, path, dev, dla_core_of(side))
        engines[_TOWER_OF_INPUT.get(eng.input, t)] = eng
    base = Path(target) if Path(target).is_dir() else Path(target).parent
    sidecars = {_TOWER_OF_INPUT.get(e.input, t): sidecars.get(t) for t, e in zip(files, engines.values())}
    return TrtRuntime(engines, sidecars, name=Path(target).name, device=str(dev), base_dir=base, lib=lib)
