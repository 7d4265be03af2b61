"""The student architecture, its directory format, and conversion from/to open_clip."""

from __future__ import annotations

import os

from .clip import ClipModel, TowerMasks
from .layers import BlockMasks
from .package import ClipPackage, is_model_dir, load_model_dir, read_config, save_model_dir
from .shape import ClipShape, TextShape, TowerShape, VisionShape


def load_package(spec: str | os.PathLike, device: str = "cpu") -> ClipPackage:
    """A model directory of this project, any open_clip spec, or ``builtin:NAME`` (see ``models.resolve``)."""
    from .resolve import resolve_model

    return resolve_model(spec, device).package


__all__ = [
    "BlockMasks",
    "ClipModel",
    "ClipPackage",
    "ClipShape",
    "TextShape",
    "TowerMasks",
    "TowerShape",
    "VisionShape",
    "is_model_dir",
    "load_model_dir",
    "load_package",
    "read_config",
    "save_model_dir",
]
