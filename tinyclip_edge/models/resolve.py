"""One resolver for "a model spec": the teacher of a recipe, the source of an export, the reference of parity.

Accepted (the user-facing syntax is unchanged):

- a ``ClipPackage`` in memory;
- a model directory of this project (``config.json`` + ``model.safetensors``; config and weights are checked
  against each other);
- open_clip: ``NAME`` (random init), ``NAME:TAG`` (pretrained tag), ``NAME:/path/ckpt``, ``CONFIG.json:/path/ckpt``,
  ``hf-hub:org/repo``, ``local-dir:/path`` or a directory holding ``open_clip_config.json``;
- ``builtin:NAME``: a teacher tinyclip-edge trains once from the packaged recipe NAME and caches. Training needs
  the compression core, which ``models`` must not import, so the compression core registers it as a hook
  (``register_builtin``; ``compress.runner`` does so when imported, and the CLI registers a lazy one). Without a
  hook, a ``builtin:`` spec is a clear error.

``resolve_model`` returns the package with the digest of its weights (the weights file's sha256 where there is
one, else a digest of the state dict), which bundles record as their source.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import UserError, closest
from ..common.formats.bundle import is_bundle
from ..common.formats.model_dir import CONFIG_NAME, WEIGHTS_NAME, is_model_dir
from ..common.integrity import sha256_file
from .package import ClipPackage, load_model_dir

BUILTIN_PREFIX = "builtin:"
OPEN_CLIP_LOCAL_CONFIG = "open_clip_config.json"

# builtin:NAME -> a model directory holding the trained teacher (trained on first use)
_builtin_hook: Callable[[str], Path] | None = None


def register_builtin(hook: Callable[[str], Path]) -> None:
    """Install what turns ``builtin:NAME`` into a model directory (the compression core trains and caches it)."""
    global _builtin_hook
    _builtin_hook = hook


@dataclass
class ResolvedModel:
    package: Any  # ClipPackage
    spec: str  # what was given (directories and files made absolute)
    kind: str  # "model_dir" | "open_clip" | "package"
    weights: str | None  # the file whose sha256 is recorded, if any
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "weights": self.weights,
            "sha256": self.sha256,
            "provenance": dict(self.package.provenance),
        }


def weights_digest(model: Any) -> str:
    """sha256 over a model's parameter names, shapes, dtypes and values: identifies its weights where there is
    no weights file to hash (random init, in memory) and keys the teacher cache (compress/cache_teacher.py).
    Any dtype, bf16 included (the bytes are read as uint8)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights_file(spec: str) -> str | None:
    """The checkpoint file named in an open_clip spec ``NAME:/path`` or ``CONFIG.json:/path``."""
    _, _, weights = spec.partition(":")
    return weights if weights and Path(weights).is_file() else None


def _absolute_spec(spec: str) -> str:
    """Make the file parts of a spec absolute, so a bundle's manifest still finds them from elsewhere."""
    if spec.startswith("local-dir:"):
        return f"local-dir:{Path(spec.split(':', 1)[1]).resolve()}"
    name, sep, weights = spec.partition(":")
    if Path(spec).exists():
        return str(Path(spec).resolve())
    if name.endswith(".json") and Path(name).is_file():
        name = str(Path(name).resolve())
    if weights and Path(weights).is_file():
        weights = str(Path(weights).resolve())
    return f"{name}{sep}{weights}"


def _from_model_dir(path: Path, device: Any) -> ResolvedModel:
    pkg = load_model_dir(path, device)
    weights = path / WEIGHTS_NAME
    return ResolvedModel(pkg, str(path.resolve()), "model_dir", str(weights.resolve()), sha256_file(weights))


def resolve_model(spec: Any, device: Any = "cpu", *, what: str = "model") -> ResolvedModel:
    """The package a spec names, with the digest of its weights; `what` names the role in messages
    ("teacher", "model", "reference")."""
    if isinstance(spec, ClipPackage):
        if spec.path is not None and is_model_dir(spec.path):
            weights = Path(spec.path) / WEIGHTS_NAME
            return ResolvedModel(spec, str(Path(spec.path).resolve()), "model_dir", str(weights), sha256_file(weights))
        return ResolvedModel(spec, "<in memory>", "package", None, weights_digest(spec.model))
    if not isinstance(spec, (str, os.PathLike)):
        raise UserError(f"cannot use a {type(spec).__name__} as a {what}: pass a model directory or an open_clip spec")
    spec = os.fspath(spec)
    if not spec:
        raise UserError(f"no {what} given: pass a model directory or an open_clip spec")
    if spec.startswith(BUILTIN_PREFIX):
        if _builtin_hook is None:
            raise UserError(
                f"'{spec}' is a built-in teacher, which the compression core trains; it is not loaded in "
                "this program (use the tinyclip-edge CLI, or import tinyclip_edge.compress.runner first)"
            )
        return _from_model_dir(_builtin_hook(spec[len(BUILTIN_PREFIX) :]), device)
    path = Path(spec)
    if is_bundle(path):
        raise UserError(
            f"{spec} is an export bundle, not a model; pass the model directory it was exported from "
            "(`--format engine` builds TensorRT engines from a bundle)"
        )
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return _from_model_dir(path, device)
    if path.is_dir() and not (path / OPEN_CLIP_LOCAL_CONFIG).is_file():
        raise UserError(
            f"{spec} is a directory but not a model directory (no {CONFIG_NAME}); pass a directory "
            "written by `tinyclip-edge compress` or an open_clip spec"
        )
    if not path.exists() and ":" not in spec:
        if "/" in spec or os.sep in spec:
            raise UserError(f"model directory not found: {spec}")
        _check_open_clip_name(spec)
    from .openclip import package_from_open_clip

    pkg = package_from_open_clip(spec)
    pkg.model.to(device)
    weights = _weights_file(spec)
    digest = sha256_file(weights) if weights else weights_digest(pkg.model)
    return ResolvedModel(
        pkg, _absolute_spec(spec), "open_clip", str(Path(weights).resolve()) if weights else None, digest
    )


def _check_open_clip_name(name: str) -> None:
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(
            f"model not found: '{name}' is neither a model directory nor an open_clip model name"
            f"{closest(name, open_clip.list_models())}"
        )
