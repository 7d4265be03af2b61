"""Image-caption data: the built-in procedural scenes and real CSV / COCO files."""

from .sources import Pair, PairSource, UnreadableImage, check_readable, open_source

__all__ = ["Pair", "PairSource", "UnreadableImage", "check_readable", "open_source"]
