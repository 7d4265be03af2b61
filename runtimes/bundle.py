"""Reading an export bundle's manifest (docs/FORMATS.md, "Export bundle").

It lives in `runtimes` rather than `export` because every runtime that opens a bundle (ONNX Runtime,
TensorRT on a Jetson) needs it, and `runtimes` must not depend on `export`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.io import atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "tinyclip-edge/bundle"
BUNDLE_VERSION = 1


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a bundle directory, checked for format and version."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise UserError(f"export bundle not found: {bundle_dir}")
    if not is_bundle(bundle_dir):
        raise UserError(f"{bundle_dir} is not an export bundle (no {MANIFEST_NAME}); "
                        "create one with `tinyclip-edge export MODEL_DIR --format onnx --out DIR`")
    manifest = read_json(bundle_dir / MANIFEST_NAME, what="bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{bundle_dir / MANIFEST_NAME} is not a tinyclip-edge bundle manifest "
                        f"(format={manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > BUNDLE_VERSION:
        raise UserError(f"{bundle_dir} was written by a newer tinyclip-edge (bundle format "
                        f"{manifest['format_version']}); upgrade tinyclip-edge to read it")
    return manifest


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomically replace the manifest (used when engines are added to an existing bundle)."""
    atomic_write_json(Path(bundle_dir) / MANIFEST_NAME, manifest)


def tower_file(bundle_dir: str | os.PathLike, manifest: dict[str, Any], tower: str) -> Path:
    """The ONNX graph of one tower; a clear error when the bundle lacks it."""
    towers = manifest.get("towers", {})
    if tower not in towers:
        raise UserError(f"bundle {bundle_dir} has no {tower} tower (it holds: {', '.join(towers) or 'none'})")
    path = Path(bundle_dir) / towers[tower]["file"]
    if not path.is_file():
        raise UserError(f"bundle {bundle_dir} is incomplete: {path.name} is missing; re-export it")
    return path
