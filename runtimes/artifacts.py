"""What an artifact holds, read from its metadata only (no weights loaded, no GPU needed).

The bench uses this to reject a tower an artifact does not have, or a batch outside an engine's
optimization profile, before it opens anything, and to report size on disk and parameter counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.formats.bundle import BundleManifest
from ..common.formats.engine import EngineSidecar
from ..common.formats.model_dir import WEIGHTS_NAME, ModelConfig
from ..common.vocab import TOWERS
from .base import KIND_BACKENDS, Runtime, artifact_kind


@dataclass
class ArtifactInfo:
    name: str
    path: Path | None
    backend: str
    kind: str  # model-dir | bundle | onnx | engine | module
    towers: tuple[str, ...]
    batch_range: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # tower -> (min, max|None)
    files: list[Path] = field(default_factory=list)  # what the runtime loads (for size on disk)
    params: dict[str, int] | None = None  # image / text / total when known
    precision: str | None = None
    manifest: BundleManifest | None = None  # a bundle's, read and verified once: the runtime opens with it

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.is_file())

    def check(self, tower: str, batches: list[int]) -> None:
        """One clear error for a tower the artifact lacks or a batch outside its range."""
        if tower not in self.towers:
            other = [t for t in self.towers if t != tower]
            hint = f"; pass --tower {other[0]}" if len(other) == 1 else ""
            raise UserError(f"{self.name} has no {tower} tower (it holds: {', '.join(self.towers) or 'none'}){hint}")
        lo, hi = self.batch_range.get(tower, (1, None))
        bad = [b for b in batches if b < lo or (hi is not None and b > hi)]
        if bad:
            what = "engine optimization profile" if self.backend == "trt" else "graph"
            raise UserError(
                f"batch {bad[0]} is outside {self.name}'s {tower} {what} ({lo}..{hi}); pass batches in "
                f"that range or rebuild the engine with a wider --batch-profile MIN,OPT,MAX"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "backend": self.backend,
            "kind": self.kind,
            "towers": list(self.towers),
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "params": (self.params or {}).get("total"),
            "params_by_tower": self.params,
            "batch_range": {t: list(r) for t, r in self.batch_range.items()},
        }


def inspect_artifact(target: Any, backend: str | None = None) -> ArtifactInfo:
    """`target`: a path, an nn.Module / ClipPackage (opened with pyt), or an already opened Runtime."""
    if isinstance(target, Runtime):
        return _runtime_info(target)
    if not isinstance(target, (str, os.PathLike)):
        return _module_info(target)
    path = Path(target)
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    kind = artifact_kind(path)
    backend = backend or KIND_BACKENDS[kind]
    if kind == "engine":
        return _engine_info(path)
    if kind == "bundle":
        return _bundle_info(path, backend)
    if kind == "onnx":
        return _onnx_info(path, backend)
    cfg = ModelConfig.read(path)
    return ArtifactInfo(
        path.name,
        path,
        backend,
        "model-dir",
        TOWERS,
        files=[path / WEIGHTS_NAME],
        params=dict(cfg.params) or None,
        precision="fp32",
    )


def _module_info(module: Any) -> ArtifactInfo:
    return ArtifactInfo(type(module).__name__, None, "pyt", "module", TOWERS, params=_params(module))


def _runtime_info(rt: Runtime) -> ArtifactInfo:
    spec = rt.input_spec()
    return ArtifactInfo(
        rt.name,
        None,
        rt.backend,
        "runtime",
        tuple(rt.towers),
        {t: (spec.min_batch, spec.max_batch) for t in rt.towers},
        params=_params(getattr(rt, "model", None)),
        precision=rt.precision,
    )


def _params(module: Any) -> dict[str, int] | None:
    module = getattr(module, "model", module)  # a ClipPackage holds its model
    if hasattr(module, "num_params"):
        return module.num_params()
    if hasattr(module, "parameters"):
        return {"total": sum(p.numel() for p in module.parameters())}
    return None


def read_sidecar(engine: Path) -> EngineSidecar | None:
    """The engine's validated sidecar (None without one); the engine is checked against its recorded digest."""
    return EngineSidecar.read(engine)


def _engine_info(path: Path, name: str | None = None) -> ArtifactInfo:
    side = read_sidecar(path)
    if side is None:  # without a sidecar nothing is known until TensorRT opens it on a GPU
        return ArtifactInfo(name or path.name, path, "trt", "engine", TOWERS, files=[path])
    tower, prof = side.tower, side.profile
    params = {tower: side.params} if side.params else None
    return ArtifactInfo(
        name or path.name,
        path,
        "trt",
        "engine",
        (tower,),
        {tower: (prof.min, prof.max)},
        [path],
        params,
        side.precision,
    )


def _bundle_info(path: Path, backend: str) -> ArtifactInfo:
    manifest = BundleManifest.read(path)
    if backend == "trt":
        engines = bundle_engines(path, manifest)
        parts = [_engine_info(manifest.engine_path(path, t)) for t in engines]
        return ArtifactInfo(
            path.name,
            path,
            "trt",
            "bundle",
            tuple(t for p in parts for t in p.towers),
            {t: r for p in parts for t, r in p.batch_range.items()},
            [f for p in parts for f in p.files],
            manifest.tower_params(),
            manifest.precision,
            manifest,
        )
    files = [manifest.tower_path(path, t) for t in manifest.towers]
    files += [path / e.external_data for e in manifest.towers.values() if e.external_data]
    return ArtifactInfo(
        path.name,
        path,
        backend,
        "bundle",
        tuple(t for t in TOWERS if t in manifest.towers),
        {},
        files,
        manifest.tower_params(),
        manifest.precision,
        manifest,
    )


def bundle_engines(path: Path, manifest: BundleManifest | None = None) -> dict[str, Any]:
    """The manifest's engine entries (tower -> EngineEntry); an error when none were built."""
    engines = (manifest or BundleManifest.read(path)).engines
    if not engines:
        raise UserError(
            f"{path} has no TensorRT engines; build them on this device with "
            f"`tinyclip-edge export {path} --format engine`"
        )
    return engines


def _onnx_info(path: Path, backend: str) -> ArtifactInfo:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {"images": "image", "tokens": "text"}
    towers, ranges = [], {}
    for inp in model.graph.input:
        tower = names.get(inp.name)
        if tower:
            towers.append(tower)
            dim0 = inp.type.tensor_type.shape.dim[0]
            ranges[tower] = (dim0.dim_value, dim0.dim_value) if dim0.HasField("dim_value") else (1, None)
    n = sum(int(_numel(t.dims)) for t in model.graph.initializer)
    tower = towers[0] if len(towers) == 1 else "total"
    return ArtifactInfo(
        path.name,
        path,
        backend,
        "onnx",
        tuple(towers) or TOWERS,
        ranges,
        [path],
        {tower: n, "total": n} if tower != "total" else {"total": n},
    )


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
