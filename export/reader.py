"""The standalone reader every bundle carries (``clip_bundle.py``): a verbatim copy of
``tinyclip_edge/common/clip_bundle.py``, which imports only the standard library, numpy, Pillow and
onnxruntime, so a bundle folder alone embeds images and captions exactly as the onnxrt runtime does."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..common import clip_bundle


def write_reader(bundle_dir: Path) -> Path:
    """Copy the reader into `bundle_dir` (a bundle being written in a temporary directory)."""
    target = Path(bundle_dir) / clip_bundle.READER_NAME
    shutil.copyfile(Path(clip_bundle.__file__), target)
    return target
