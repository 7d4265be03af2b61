"""What an export starts from: a model directory, an open_clip spec, or a ClipPackage in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import UserError, closest
from ..runtimes.bundle import is_bundle
from .graphs import sha256_file, sha256_state


@dataclass
class Source:
    package: Any                 # tinyclip_edge.models.ClipPackage
    spec: str                    # what was given (directories and files made absolute)
    kind: str                    # "model_dir" | "open_clip" | "package"
    weights: str | None          # the file whose sha256 is recorded, if any
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "weights": self.weights, "sha256": self.sha256,
                "provenance": dict(self.package.provenance)}


def _weights_file(spec: str) -> str | None:
    """The checkpoint file named in an open_clip spec ``NAME:/path`` or ``CONFIG.json:/path``."""
    _, _, weights = spec.partition(":")
    return weights if weights and Path(weights).is_file() else None


def _absolute_spec(spec: str) -> str:
    """Make the file parts of a spec absolute, so a bundle's manifest still finds them from elsewhere."""
    name, sep, weights = spec.partition(":")
    if Path(spec).exists():
        return str(Path(spec).resolve())
    if name.endswith(".json") and Path(name).is_file():
        name = str(Path(name).resolve())
    if weights and Path(weights).is_file():
        weights = str(Path(weights).resolve())
    return f"{name}{sep}{weights}"


def _check_open_clip_name(name: str) -> None:
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(f"model not found: '{name}' is neither a model directory nor an open_clip model name"
                        f"{closest(name, open_clip.list_models())}")


def resolve_source(source: Any) -> Source:
    """Load what is to be exported, with the digest of its weights."""
    from ..models import ClipPackage, load_model_dir, load_package
    from ..models.package import WEIGHTS_NAME, is_model_dir

    if isinstance(source, ClipPackage):
        if source.path is not None and is_model_dir(source.path):
            weights = Path(source.path) / WEIGHTS_NAME
            return Source(source, str(Path(source.path).resolve()), "model_dir", str(weights), sha256_file(weights))
        return Source(source, "<in memory>", "package", None, sha256_state(source.model))
    spec = os.fspath(source)
    path = Path(spec)
    if is_bundle(path):
        raise UserError(f"{spec} is an export bundle, not a model; `--format onnx` exports a model directory "
                        "(use `--format engine` to build TensorRT engines from a bundle)")
    if path.is_dir() and (path / "config.json").is_file():
        pkg = load_model_dir(path)
        weights = path / WEIGHTS_NAME
        return Source(pkg, str(path.resolve()), "model_dir", str(weights.resolve()), sha256_file(weights))
    if path.is_dir() and not (path / "open_clip_config.json").is_file():
        raise UserError(f"{spec} is a directory but not a model directory (no config.json); pass a directory "
                        "written by `tinyclip-edge compress` or an open_clip spec")
    if not path.exists() and ":" not in spec:
        if "/" in spec or os.sep in spec:
            raise UserError(f"model directory not found: {spec}")
        _check_open_clip_name(spec)
    pkg = load_package(spec)
    weights = _weights_file(spec)
    digest = sha256_file(Path(weights)) if weights else sha256_state(pkg.model)
    return Source(pkg, _absolute_spec(spec), "open_clip", str(Path(weights).resolve()) if weights else None, digest)
