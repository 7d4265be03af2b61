"""Image regions for DCLIP's meta teacher: where they come from, and a cached YOLO detection pass.

Modes (``dclip.regions`` in a recipe):

- ``boxes``: the dataset's own boxes: the scenes' ground-truth shapes, or COCO instances
  (``dclip.instances=instances_train2017.json``, matched to pairs by image file name);
- ``grid``: a fixed 2 x 2 grid;
- a ``regions.jsonl`` file written by ``tinyclip-edge regions`` (YOLO detections, matched by image key);
- ``yolo``: detect with ``dclip.detector`` once per dataset (cached), then as above.

Boxes are normalised ``[x0, y0, x1, y1]`` in [0, 1]. An image with no region falls back to the whole image;
such images are counted and reported. Detection results are cached per image under
``<cache>/detections/<detector hash>/<image content hash>.c<confidence>.m<max regions>.json``, so a dataset
is detected once per detector and settings; every entry and every regions file line is checked
(`check_record`: one score in [0, 1] per box) and an entry is filtered by the settings again when read.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import MissingDependency, UserError
from ..common.integrity import sha256_file
from ..common.io import atomic_write_json, atomic_write_text, cache_dir, read_json
from .limits import MAX_REGIONS
from .optin import OPT_INS
from .pairs import ReadStats, read_pairs
from .sources import Pair, PairSource

log = logging.getLogger("tinyclip_edge")
WHOLE = [0.0, 0.0, 1.0, 1.0]
YAML_EXTS = (".yaml", ".yml")
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_record(rec: Any) -> str | None:
    """Why `rec` is not a regions record (``boxes`` [[x0, y0, x1, y1], ...], ``scores`` one in [0, 1] per
    box), or None. Every regions file line and every detection-cache entry is read through it."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    boxes, scores = rec.get("boxes"), rec.get("scores")
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(_number(v) for v in b) for b in boxes
    ):
        return "'boxes' must be a list of [x0, y0, x1, y1] numbers"
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) != len(boxes):
        n = len(scores) if isinstance(scores, list) else "no list of"
        return f"{n} scores for {len(boxes)} boxes; give one score per box"
    if not all(_number(v) and 0.0 <= v <= 1.0 for v in scores):
        return "every score must be a number in [0, 1]"
    return None


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
        except (ValueError, RecursionError) as e:
            rec, why = None, f"not JSON: {e}"
        else:
            why = check_record(rec) or (None if "key" in rec else "no 'key'")
        if why:
            raise UserError(
                f"{path} line {n} is not a regions record ({why}); expected "
                '{"key": ..., "boxes": [[x0, y0, x1, y1], ...], "scores": [0..1, one per box]}'
            )
        out[str(rec["key"])] = _clean(rec["boxes"], rec.get("scores"))
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
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
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


def _check_yaml_detector(path: Path) -> None:
    """Refuse a model .yaml that would make ultralytics run code while building it: its parser calls
    ``eval`` on ``activation`` and looks layer names up among its own module's globals (functions that
    download, install or unpickle). Layers must be torch or ultralytics nn.Module classes; an activation
    must be ``nn.Name(literal, ...)``."""
    import torch
    from ultralytics.nn import tasks

    def bad(why: str) -> UserError:
        return UserError(f"detector {path} is not a model .yaml ultralytics can build safely: {why}")

    try:
        d = tasks.yaml_model_load(path)  # ultralytics' own reader (a YAML safe loader): the dict it will build
    except Exception as e:  # noqa: BLE001  a broken YAML file raises many types
        raise bad(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}") from None
    layers = (d.get("backbone") or []) + (d.get("head") or []) if isinstance(d, dict) else None
    if not layers or not all(isinstance(x, list) and len(x) == 4 for x in layers):
        raise bad("expected 'backbone' and 'head' lists of [from, repeats, module, args]")
    for _, _, m, args in layers:
        if not isinstance(m, str) or not isinstance(args, list):
            raise bad(f"layer {m!r} is not a module name with an argument list")
        cls = getattr(torch.nn, m[3:], None) if m.startswith("nn.") else vars(tasks).get(m)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise bad(f"layer {m!r} is not a torch or ultralytics nn.Module")
    act = d.get("activation")
    if act is not None:
        try:
            call = ast.parse(str(act), mode="eval").body
            assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            assert isinstance(call.func.value, ast.Name) and call.func.value.id == "nn"
            cls = getattr(torch.nn, call.func.attr, None)
            assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
            for v in [*call.args, *(k.value for k in call.keywords)]:
                ast.literal_eval(v)
        except (SyntaxError, AssertionError, ValueError):
            raise bad(f"activation {act!r} must be nn.Name(literal arguments), e.g. nn.SiLU()") from None


def load_detector(path: str) -> Any:
    """An ultralytics YOLO detection model: a model .yaml (checked first: it builds an untrained detector
    without running code) or, only when the command line passed --trust-detector, pickled weights (.pt),
    which ultralytics unpickles: unpickling a file can run any code it holds."""
    YOLO = _import_yolo()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"detector file not found: {path}; pass YOLO detection weights, e.g. --detector yolo11n.pt")
    if p.suffix.lower() in YAML_EXTS:
        _check_yaml_detector(p)
    elif not OPT_INS.trust_detector:
        raise UserError(
            f"detector {path} would be unpickled (ultralytics reads {p.suffix or 'such'} files with pickle, which "
            "runs any code the file holds); pass --trust-detector on the command line if you trust it, or "
            "give a model .yaml. A recipe cannot allow it"
        )
    else:
        log.warning("--trust-detector: unpickling %s; it can run any code it holds, use only files you trust", path)
    try:
        model = YOLO(str(p))
    except Exception as e:  # noqa: BLE001  ultralytics raises many types for a file that is not a model
        raise UserError(
            f"{path} is not a YOLO model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
            "pass ultralytics YOLO detection weights (.pt, with --trust-detector) or a model .yaml"
        ) from None
    if getattr(model, "task", None) != "detect":
        raise UserError(
            f"{path} is a YOLO '{getattr(model, 'task', '?')}' model, not a detector; pass YOLO detection weights"
        )
    return model


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A detection-cache entry, or None when there is none or it is unusable (then it is detected again and
    rewritten: the entry is ours, named by the detector, the image and the settings)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        rec = None
    why = "not JSON" if rec is None else check_record(rec)
    if why is None and not isinstance(rec.get("scores"), list):
        why = "no scores"
    if (
        why is None
        and "classes" in rec
        and (not isinstance(rec["classes"], list) or len(rec["classes"]) != len(rec["boxes"]))
    ):
        why = "classes do not match the boxes"
    if why:
        log.warning("detection cache entry %s is corrupt (%s); detecting that image again", path, why)
        return None
    return rec


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


def _distinct_images(source: PairSource) -> list[int]:
    """The indices to read: one per image where a source has several captions per image (COCO)."""
    rows = getattr(source, "rows", None)
    if rows is None:
        return list(range(len(source)))
    first: dict[str, int] = {}
    for i, (path, _) in enumerate(rows):
        first.setdefault(path, i)
    return sorted(first.values())


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
    image key: key, sha256, boxes, scores, classes). Results are cached by (detector file hash, image hash,
    confidence, max_regions)."""
    if not source.finite:
        raise UserError(
            f"{source.name} is unlimited; detect regions on a finite dataset (a CSV, a COCO file, "
            "scenes:val) or use dclip.regions=boxes for the scenes' ground truth"
        )
    if not _number(confidence) or not 0.0 <= confidence <= 1.0:
        raise UserError(f"--confidence must be a detection score in [0, 1], not {confidence!r}")
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or not 1 <= max_regions <= MAX_REGIONS:
        raise UserError(f"--max-regions must be a whole number in 1..{MAX_REGIONS}, not {max_regions!r}")
    model = load_detector(detector)
    root = (cache or cache_dir() / "detections") / sha256_file(detector)[:16]
    root.mkdir(parents=True, exist_ok=True)
    rep, lines, stats = DetectionReport(), [], ReadStats()
    seen: set[str] = set()
    for pair in read_pairs(source, _distinct_images(source), stats, progress=progress, desc="detecting regions"):
        if pair.key in seen:
            continue
        seen.add(pair.key)
        rep.images += 1
        digest = image_hash(pair.image)
        # the settings are part of the key: boxes found at one threshold are never returned for another
        cached = root / f"{digest}.c{confidence:.6g}.m{max_regions}.json"
        rec = _read_cached(cached)
        if rec is not None:
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
        # and filtered again on reading, whatever the file says
        keep = [i for i, sc in enumerate(rec["scores"]) if sc >= confidence][:max_regions]
        rec = {k: [rec[k][i] for i in keep] for k in ("boxes", "scores", "classes") if k in rec}
        rep.fallback += not rec["boxes"]
        lines.append(json.dumps({"key": pair.key, "sha256": digest, **rec}))
    rep.unreadable = stats.skipped
    if stats.skipped:
        log.warning("skipped %d unreadable image(s) (e.g. %s)", stats.skipped, stats.examples[0])
    atomic_write_text(Path(out), "\n".join(lines) + ("\n" if lines else ""))
    return rep
