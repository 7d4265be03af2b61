"""Fixed augmentations: the crop a sample gets is a pure function of (augmentation seed, sample id).

MobileCLIP's "reinforced data" stores the teacher's embeddings of augmented images once; that only works
if training later sees the very same augmented image. So the augmentation is not random per epoch but
fixed per (seed, sample): a random-resized crop (area 60-100%, aspect 3:4-4:3) drawn from a generator seeded
with both. No flip: captions say "left" and "right". Seed None means no augmentation.
"""

from __future__ import annotations

import math
import random
from typing import Any


def fixed_crop(image: Any, seed: int | None, sample_id: str) -> Any:
    """The crop of PIL `image` for (seed, sample_id); the image itself when seed is None."""
    if seed is None:
        return image
    rng = random.Random(f"{seed}/{sample_id}")
    w, h = image.size
    area = rng.uniform(0.6, 1.0) * w * h
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = max(1, min(w, round(math.sqrt(area * ratio))))
    ch = max(1, min(h, round(math.sqrt(area / ratio))))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((left, top, left + cw, top + ch))
