"""Image regions for DCLIP's meta teacher: where they come from, and a cached YOLO detection pass.

Modes (``dclip.regions`` in a recipe):

- ``boxes``: the dataset's own boxes: the scenes' ground-truth shapes, or COCO instances
  (``dclip.instances=instances_train2017.json``, matched to pairs by image file name);
- ``grid``: a fixed 2 x 2 grid;
- a ``regions.jsonl`` file written by ``tinyclip-edge regions`` (YOLO detections, matched by image key);
- ``yolo``: detect with ``dclip.detector`` once per dataset (cached), then as above.

Boxes are normalised ``[x0, y0, x1, y1]`` in [0, 1]. An image with no region falls back to the whole image;
such images are counted and reported. Detection results are cached per image under
``<cache>/detections/<detector hash>/<image content hash>.json``, so a dataset is detected once per detector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import MissingDependency, UserError
from ..common.io import atomic_write_json, atomic_write_text, cache_dir, read_json
from .pairs import ReadStats, read_pairs
from .sources import Pair, PairSource

log = logging.getLogger("tinyclip_edge")
WHOLE = [0.0, 0.0, 1.0, 1.0]
GRID = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]


@dataclass
class Regions:
    boxes: list[list[float]]
    scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes, "scores": self.scores}


def _clean(boxes: list[list[float]], scores: list[float] | None = None) -> Regions:
    out_b, out_s = [], []
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in b)
        if x1 - x0 > 1e-3 and y1 - y0 > 1e-3:
            out_b.append([x0, y0, x1, y1])
            out_s.append(float(scores[i]) if scores is not None else 1.0)
    return Regions(out_b, out_s)


def image_hash(image: Any) -> str:
    """sha256 of the decoded pixels (mode, size, bytes): the same picture gives the same key whatever its file."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def read_regions_jsonl(path: str | os.PathLike) -> dict[str, Regions]:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"regions file not found: {path}; write one with `tinyclip-edge regions DATA --detector "
            "yolo11n.pt --out regions.jsonl` or use dclip.regions=boxes|grid"
        )
    out = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[str(rec["key"])] = _clean(rec["boxes"], rec.get("scores"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{path} line {n} is not a regions record ({e}); expected "
                '{"key": ..., "boxes": [[x0, y0, x1, y1], ...], "scores": [...]}'
            ) from None
    return out


def read_coco_instances(path: str | os.PathLike) -> dict[str, Regions]:
    """COCO instances (``images`` with width/height + ``annotations`` with ``bbox`` [x, y, w, h] in pixels),
    keyed by the image's file name."""
    data = read_json(path, what="COCO instances file")  # missing, unreadable or not JSON: its own one line
    try:
        images = {im["id"]: im for im in data["images"]}
        boxes: dict[str, list[list[float]]] = {im["file_name"]: [] for im in images.values()}
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            W, H = float(im["width"]), float(im["height"])
            boxes[im["file_name"]].append([x / W, y / H, (x + w) / W, (y + h) / H])
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise UserError(
            f"{path} is not a COCO instances file ({e}); expected images with width/height and annotations with bbox"
        ) from None
    return {k: _clean(v) for k, v in boxes.items()}


@dataclass
class RegionSource:
    """A pair source whose pairs carry ``extra["regions"]`` (a dict: boxes, scores)."""

    source: PairSource
    mode: str  # boxes | grid | lookup
    lookup: dict[str, Regions] = field(default_factory=dict)
    max_regions: int = 6

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def finite(self) -> bool:
        return self.source.finite

    def __len__(self) -> int:
        return len(self.source)

    def regions(self, pair: Pair) -> Regions:
        if self.mode == "grid":
            r = Regions([list(b) for b in GRID], [1.0] * len(GRID))
        elif self.mode == "boxes" and "boxes" in pair.extra:
            r = _clean(pair.extra["boxes"])
        else:
            r = self.lookup.get(pair.key, Regions([], []))
        if not r.boxes:  # nothing detected: the whole image is the one region
            r = Regions([list(WHOLE)], [1.0])
        order = sorted(range(len(r.boxes)), key=lambda i: -r.scores[i])[: self.max_regions]
        return Regions([r.boxes[i] for i in order], [r.scores[i] for i in order])

    def __getitem__(self, i: int) -> Pair:
        pair = self.source[i]
        pair.extra["regions"] = self.regions(pair).to_dict()
        return pair

    def __getattr__(self, name: str) -> Any:  # class_names, templates, ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def fallback_count(source: PairSource, lookup: dict[str, Regions], probe: int | None = None) -> tuple[int, int]:
    """(images with no region, images looked at) for a lookup-based region source."""
    n = len(source) if probe is None else min(probe, len(source))
    missing = 0
    for i in range(n):
        key = source.rows[i][0] if hasattr(source, "rows") else source[i].key
        r = lookup.get(key)
        missing += r is None or not r.boxes
    return missing, n


# ---------------------------------------------------------------------------------------------- YOLO


def _import_yolo() -> Any:
    """ultralytics' YOLO class, imported so that it changes nothing outside the detector.

    On import, ultralytics replaces PIL.Image.open process-wide with a wrapper that, on an unreadable image,
    tries to pip-install a HEIF plugin and then raises ModuleNotFoundError instead of PIL's error: our
    readers would stop recognising corrupt images, and a run would install packages. So auto-install and
    network checks are switched off (unless the user set them) and PIL's own opener is put back.
    """
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from PIL import Image

    try:
        from ultralytics import YOLO
    except ImportError:
        raise MissingDependency("ultralytics", "detect", "YOLO region detection") from None
    try:
        from ultralytics.utils import patches

        Image.open = getattr(patches, "_image_open", Image.open)
    except ImportError:
        pass
    return YOLO


def load_detector(path: str) -> Any:
    """An ultralytics YOLO detection model from the user's weights (or a model .yaml, which builds an
    untrained one). Note: ultralytics reads .pt weights with pickle: use detector files you trust."""
    YOLO = _import_yolo()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"detector file not found: {path}; pass YOLO detection weights, e.g. --detector yolo11n.pt")
    try:
        model = YOLO(str(p))
    except Exception as e:  # noqa: BLE001  ultralytics raises many types for a file that is not a model
        raise UserError(
            f"{path} is not a YOLO model ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "pass ultralytics YOLO detection weights (.pt) or a model .yaml"
        ) from None
    if getattr(model, "task", None) != "detect":
        raise UserError(
            f"{path} is a YOLO '{getattr(model, 'task', '?')}' model, not a detector; pass YOLO detection weights"
        )
    return model


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class DetectionReport:
    images: int = 0
    cached: int = 0
    detected: int = 0
    fallback: int = 0  # images with no detected region: they use the whole image
    unreadable: int = 0

    def summary(self) -> str:
        return (
            f"{self.images} images: {self.detected} detected, {self.cached} from the cache, {self.fallback} with "
            f"no region (the whole image is used), {self.unreadable} unreadable"
        )


def detect_regions(
    source: PairSource,
    detector: str,
    out: str | os.PathLike,
    *,
    confidence: float = 0.25,
    max_regions: int = 6,
    progress: bool = True,
    cache: Path | None = None,
) -> DetectionReport:
    """Run the detector once over every distinct image of `source`, write ``regions.jsonl`` (one record per
    image key: key, sha256, boxes, scores, classes). Results are cached by (detector file hash, image hash)."""
    if not source.finite:
        raise UserError(
            f"{source.name} is unlimited; detect regions on a finite dataset (a CSV, a COCO file, "
            "scenes:val) or use dclip.regions=boxes for the scenes' ground truth"
        )
    model = load_detector(detector)
    root = (cache or cache_dir() / "detections") / _file_hash(Path(detector))[:16]
    root.mkdir(parents=True, exist_ok=True)
    rep, lines, stats = DetectionReport(), [], ReadStats()
    indices: list[int] = list(range(len(source)))
    rows = getattr(source, "rows", None)
    if rows is not None:  # several captions per image (COCO): read and detect each image once
        first: dict[str, int] = {}
        for i, (path, _) in enumerate(rows):
            first.setdefault(path, i)
        indices = sorted(first.values())
    seen: set[str] = set()
    for pair in read_pairs(source, indices, stats, progress=progress, desc="detecting regions"):
        if pair.key in seen:
            continue
        seen.add(pair.key)
        rep.images += 1
        digest = image_hash(pair.image)
        cached = root / f"{digest}.json"
        if cached.is_file():
            rec = json.loads(cached.read_text(encoding="utf-8"))
            rep.cached += 1
        else:
            res = model.predict(pair.image, conf=confidence, max_det=max_regions, verbose=False)[0]
            b = res.boxes
            rec = {
                "boxes": b.xyxyn.tolist() if b is not None else [],
                "scores": b.conf.tolist() if b is not None else [],
                "classes": [int(c) for c in b.cls.tolist()] if b is not None else [],
            }
            atomic_write_json(cached, rec)
            rep.detected += 1
        rep.fallback += not rec["boxes"]
        lines.append(json.dumps({"key": pair.key, "sha256": digest, **rec}))
    rep.unreadable = stats.skipped
    if stats.skipped:
        log.warning("skipped %d unreadable image(s) (e.g. %s)", stats.skipped, stats.examples[0])
    atomic_write_text(Path(out), "\n".join(lines) + ("\n" if lines else ""))
    return rep
