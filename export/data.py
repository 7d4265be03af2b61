"""Real image-caption data for calibration and parity, read through ``tinyclip_edge.data.open_source``.

Images go through the model's own ``Preprocess`` and captions through its tokenizer, so int8 ranges
and parity numbers are measured on exactly what a deployment feeds the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..common.errors import UserError
from ..common.preprocess import Preprocess


@dataclass
class PairData:
    source: str
    images: np.ndarray                 # [N, 3, S, S] float32, preprocessed
    captions: list[str]
    labels: np.ndarray                 # [N] class index, -1 where the pair has no label
    keys: list[str] = field(default_factory=list)
    skipped: int = 0                   # unreadable images
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def load_pairs(spec: str, count: int, preprocess: Preprocess, *, progress: bool = True,
               what: str = "data") -> PairData:
    """The first `count` readable pairs of `spec` (fewer when the source is smaller)."""
    from ..data import UnreadableImage, open_source

    if count <= 0:
        raise UserError(f"the {what} count must be positive, got {count}")
    src = open_source(spec, image_size=max(64, preprocess.image_size))
    n = min(count, len(src))
    images, captions, labels, keys, skipped = [], [], [], [], 0
    for i in tqdm(range(n), desc=f"read {what}", unit="img", disable=not progress, leave=False):
        try:
            pair = src[i]
        except UnreadableImage:
            skipped += 1
            continue
        images.append(preprocess(pair.image))
        captions.append(pair.caption)
        labels.append(int(pair.extra.get("label", -1)))
        keys.append(pair.key)
    if not images:
        raise UserError(f"none of the {n} images of {spec} could be read; check the image paths in the {what} file")
    classes = list(src.class_names()) if hasattr(src, "class_names") else []
    templates = list(src.templates()) if hasattr(src, "templates") else []
    return PairData(spec, np.stack(images).astype(np.float32), captions, np.asarray(labels, np.int64), keys,
                    skipped, classes, templates)
