"""A folder of images with caption sidecars: ``cat.jpg`` + ``cat.txt`` (the caption), searched recursively.

Images without a sidecar are left out and counted in the log; a folder with no pair at all is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..common.errors import UserError

log = logging.getLogger("tinyclip_edge")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def folder_rows(folder: Path) -> list[tuple[str, str]]:
    """(image path relative to `folder`, caption) for every image with a non-empty .txt sidecar, sorted."""
    rows, lonely = [], 0
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        side = img.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else ""
        if not caption:
            lonely += 1
            continue
        rows.append((str(img.relative_to(folder)), caption))
    if not rows:
        raise UserError(
            f"{folder} holds no image with a caption sidecar (e.g. cat.jpg + cat.txt); "
            "or pass a CSV/TSV, a COCO captions JSON or shards"
        )
    if lonely:
        log.warning("%s: %d image(s) without a .txt caption left out", folder, lonely)
    return rows
