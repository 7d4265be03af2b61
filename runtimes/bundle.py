"""Reading an export bundle's manifest (docs/FORMATS.md, "Export bundle").

The schema itself lives in ``tinyclip_edge.common.schemas`` (``BundleManifest``: types, ranges, paths inside the
bundle, every file's sha256). These names stay here because every runtime that opens a bundle uses them, and
``runtimes`` must not depend on ``export``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..common.schemas import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MANIFEST_NAME,
    BundleManifest,
    is_bundle,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MANIFEST_NAME",
    "BundleManifest",
    "is_bundle",
    "read_manifest",
    "tower_file",
    "write_manifest",
]


def read_manifest(bundle_dir: str | os.PathLike, *, verify: bool = True) -> BundleManifest:
    """The bundle's manifest, validated, with every path inside the bundle and (`verify`) every file's digest."""
    return BundleManifest.read(bundle_dir, verify=verify)


def write_manifest(bundle_dir: str | os.PathLike, manifest: BundleManifest) -> None:
    """Atomically replace the manifest (used when engines are added to an existing bundle)."""
    manifest.write(bundle_dir)


def tower_file(bundle_dir: str | os.PathLike, manifest: BundleManifest, tower: str) -> Path:
    """The ONNX graph of one tower; a clear error when the bundle lacks it."""
    return manifest.tower_path(bundle_dir, tower)
