"""Ranges of the data commands' numeric options, shared by the CLI (checked before any import of torch) and
the library functions (checked again for callers that skip the CLI)."""

from __future__ import annotations

IMAGE_SIZES = (8, 4096)  # scenes' render size: 4096^2 RGB is 48 MiB per image, far beyond any CLIP input
CACHE_BATCH = (1, 65536)  # cache-teacher --batch-size
MAX_REGIONS = 1000  # regions --max-regions (and detect_regions)
