"""DCLIP's recipe section (``dclip:``): the regions every stage's batches carry and the meta teacher's head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ....common.typed import POSITIVE_INT, Range


@dataclass
class DclipCfg:
    """DCLIP's region-aware meta teacher (method: dclip-meta) and the regions every stage's batches carry."""

    regions: str = "boxes"  # boxes (dataset boxes: scenes, dclip.instances) | grid | yolo | a .jsonl
    detector: str | None = None  # YOLO detection weights for regions: yolo (ultralytics, extra `detect`)
    instances: str | None = None  # COCO instances JSON for regions: boxes on COCO data
    confidence: Annotated[float, Range(0, 1)] = 0.25  # YOLO confidence threshold, in [0, 1]
    max_regions: POSITIVE_INT = 6  # region crops per image, >= 1 (the whole image comes on top)
    max_spans: POSITIVE_INT = 6  # caption spans per caption, >= 1 (the whole caption comes on top)
    heads: POSITIVE_INT = 8  # attention heads of the cross-attention block (a divisor of the width)
    pool_temperature: Annotated[float, Range(0, None, lo_open=True)] = 2.0  # pooling: softmax(cos(x_i, mean) / T)
