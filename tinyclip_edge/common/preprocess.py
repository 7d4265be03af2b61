"""Image preprocessing shared by training data, evaluation and end-to-end runtimes (numpy + PIL).

The same function feeds the PyTorch reference and the exported engines, so parity and end-to-end
latency measure the same pipeline a deployment runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


@dataclass
class Preprocess:
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # resize the shortest side, then centre-crop (open_clip's default)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {k: d[k] for k in ("image_size", "interpolation", "resize_mode") if k in d}
        return cls(mean=tuple(d.get("mean", OPENAI_MEAN)), std=tuple(d.get("std", OPENAI_STD)), **known)

    def resize_crop(self, image: "Any") -> "Any":
        """PIL image -> RGB PIL image of image_size x image_size."""
        from PIL import Image

        image = image.convert("RGB")
        size = self.image_size
        resample = Image.Resampling(_INTERP.get(self.interpolation, 3))
        w, h = image.size
        if self.resize_mode == "squash":
            return image.resize((size, size), resample)
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))

    def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW float32, normalised."""
        x = rgb_uint8.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, image: "Any") -> np.ndarray:
        return self.normalize(np.asarray(self.resize_crop(image)))
