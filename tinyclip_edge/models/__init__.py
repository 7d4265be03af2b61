"""The student architecture, its directory format, and conversion from/to open_clip."""

from __future__ import annotations

import os

from .clip import ClipModel, TowerMasks
from .layers import BlockMasks
from .package import ClipPackage, is_model_dir, load_model_dir, read_config, save_model_dir
from .shape import TOWERS, ClipShape, TextShape, TowerShape, VisionShape


def load_package(spec: str | os.PathLike, device: str = "cpu") -> ClipPackage:
    """A model directory of this project, or any open_clip spec (see ``openclip.load_open_clip``)."""
    if is_model_dir(spec) or os.path.isfile(os.path.join(str(spec), "config.json")):
        return load_model_dir(spec, device)
    from .openclip import package_from_open_clip

    pkg = package_from_open_clip(str(spec))
    pkg.model.to(device)
    return pkg


__all__ = [
    "TOWERS", "BlockMasks", "ClipModel", "ClipPackage", "ClipShape", "TextShape", "TowerMasks", "TowerShape",
    "VisionShape", "is_model_dir", "load_model_dir", "load_package", "read_config", "save_model_dir",
]
