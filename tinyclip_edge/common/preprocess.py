"""Image preprocessing shared by training data, evaluation and end-to-end runtimes (numpy + PIL).

The same function feeds the PyTorch reference and the exported engines, so parity and end-to-end
latency measure the same pipeline a deployment runs. The pixel pipeline itself lives in
``clip_bundle.py`` (the standalone reader every bundle carries), so the runtimes and a bundle's own
reader cannot drift apart; it equals open_clip's ``image_transform(..., is_train=False)`` for every
PIL mode (tests/test_interop_preprocess.py compares pixel tensors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .formats import clip_bundle

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Preprocess:
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # resize the shortest side, then centre-crop (open_clip's default)
    fill_color: int = 0  # padding value of resize_mode "longest" (open_clip's fill_color)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {k: d[k] for k in ("image_size", "interpolation", "resize_mode", "fill_color") if k in d}
        return cls(mean=tuple(d.get("mean", OPENAI_MEAN)), std=tuple(d.get("std", OPENAI_STD)), **known)

    def resize_crop(self, image: Any) -> Any:
        """PIL image (any mode) -> RGB PIL image of image_size x image_size, as open_clip makes it."""
        return clip_bundle.resize_crop(image, self.to_dict())

    def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW float32, normalised."""
        return clip_bundle.normalize(rgb_uint8, self.mean, self.std)

    def __call__(self, image: Any) -> np.ndarray:
        return self.normalize(np.asarray(self.resize_crop(image)))
