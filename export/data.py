"""Real image-caption data for calibration and parity, read through ``tinyclip_edge.data.open_source``.

Images go through the model's own ``Preprocess`` and captions through its tokenizer, so int8 ranges
and parity numbers are measured on exactly what a deployment feeds the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..common.errors import UserError
from ..common.preprocess import Preprocess


@dataclass
class PairData:
    source: str
    images: np.ndarray  # [N, 3, S, S] float32, through the first preprocess
    other_images: list[np.ndarray]  # the same images through each further preprocess (e.g. a teacher's)
    captions: list[str]
    labels: np.ndarray  # [N] class index, -1 where the pair has no label
    keys: list[str] = field(default_factory=list)
    skipped: int = 0  # unreadable images
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def load_pairs(
    spec: str, count: int, preprocess: Preprocess, *others: Preprocess, progress: bool = True, what: str = "data"
) -> PairData:
    """The first `count` readable pairs of `spec` (fewer when the source is smaller), each image
    preprocessed by `preprocess` and by every one of `others`."""
    from ..data import open_source
    from ..data.pairs import ReadStats, read_pairs

    if count <= 0:
        raise UserError(f"the {what} count must be positive, got {count}")
    pres = (preprocess, *others)
    src = open_source(spec, image_size=max(64, *(p.image_size for p in pres)))
    n = min(count, len(src))
    images: list[list[np.ndarray]] = [[] for _ in pres]
    captions, labels, keys, stats = [], [], [], ReadStats()
    for pair in read_pairs(src, range(n), stats, progress=progress, desc=f"read {what}"):
        for out, pre in zip(images, pres):
            out.append(pre(pair.image))
        captions.append(pair.caption)
        labels.append(int(pair.extra.get("label", -1)))
        keys.append(pair.key)
    if not captions:
        raise UserError(f"none of the {n} images of {spec} could be read; check the image paths in the {what} file")
    classes = list(src.class_names()) if hasattr(src, "class_names") else []
    templates = list(src.templates()) if hasattr(src, "templates") else []
    stacked = [np.stack(im).astype(np.float32) for im in images]
    return PairData(
        spec, stacked[0], stacked[1:], captions, np.asarray(labels, np.int64), keys, stats.skipped, classes, templates
    )
