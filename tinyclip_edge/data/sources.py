"""Image-caption sources behind one spec string.

- ``scenes:train`` (unlimited), ``scenes:val`` (fixed 1,000 pairs), ``scenes:val:500``, ``scenes:calib``
- ``path/to/pairs.csv`` or ``.tsv``: open_clip-style, one row per pair, image path + caption columns
- ``path/to/captions.json``: COCO captions (``images`` + ``annotations``)

An unreadable image raises ``UnreadableImage``; batch builders skip it and count it, so one bad file never
stops a long run. ``check_readable`` fails fast (one clear line) when none of a sample of images can be read.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..common.errors import UserError
from ..common.io import read_json
from . import scenes as sc

log = logging.getLogger("tinyclip_edge")
SCENES_VAL_SIZE = 1000
# open_clip's CSV column names (its --csv-img-key / --csv-caption-key defaults): every CSV reader's default
CSV_IMAGE_KEY, CSV_CAPTION_KEY = "filepath", "title"
UNLIMITED = 2**62


class UnreadableImage(Exception):
    """An image file is missing or corrupt; the pair is skipped."""


@dataclass
class Pair:
    image: Image.Image
    caption: str
    key: str  # identifies the image (several captions may share it)
    extra: dict[str, Any] = field(default_factory=dict)


class PairSource(Protocol):
    name: str
    finite: bool

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Pair: ...


@dataclass
class ScenesSource:
    split: str
    size: int
    image_size: int = 64
    name: str = ""
    finite: bool = True

    def __post_init__(self) -> None:
        self.name = self.name or f"scenes:{self.split}"
        self.seed = sc.SPLIT_SEEDS[self.split]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Pair:
        scene = sc.make_scene(self.seed, i)
        extra = {
            "negative": scene.negative,
            "label": scene.label,
            "boxes": scene.boxes,
            "objects": [f"{s.colour} {s.kind}" for s in scene.shapes],
            **scene.meta,
        }
        return Pair(sc.render(scene, self.image_size), scene.caption, f"{self.name}/{i}", extra)

    def class_names(self) -> list[str]:
        return list(sc.CLASSES)

    def templates(self) -> list[str]:
        return list(sc.TEMPLATES)


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(f"'{path}': file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"'{path}': {e}") from None


@dataclass
class FileSource:
    """Pairs listed in a CSV/TSV or COCO captions file; images are read lazily."""

    name: str
    rows: list[tuple[str, str]]  # (image path, caption)
    root: Path
    finite: bool = True

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Pair:
        path, caption = self.rows[i]
        full = Path(path) if os.path.isabs(path) else self.root / path
        return Pair(load_image(full), caption, path)


def _read_csv(path: Path, image_key: str, caption_key: str, sep: str | None) -> list[tuple[str, str]]:
    if sep is None:
        sep = "\t" if path.suffix == ".tsv" else ","
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would otherwise become part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=sep)
            cols = reader.fieldnames or []
            for key, what in ((image_key, "csv_image_key"), (caption_key, "csv_caption_key")):
                if key not in cols:
                    raise UserError(
                        f"{path} has no column '{key}' (columns: {', '.join(cols) or 'none'}); "
                        f"set data.{what}=<column>" + ("" if sep != "," else " or data.csv_separator")
                    )
            rows = [(r[image_key] or "", (r[caption_key] or "").strip()) for r in reader]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text CSV") from None
    return _nonempty(path, rows)


def _nonempty(path: Path, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rows with both an image path and a caption; the others are dropped and counted on the terminal."""
    kept = [(i, c) for i, c in rows if i.strip() and c]
    if len(kept) < len(rows):
        log.warning(
            "%s: dropped %d of %d row(s) with an empty image path or caption", path, len(rows) - len(kept), len(rows)
        )
    return kept


def _read_coco(path: Path) -> list[tuple[str, str]]:
    data = read_json(path, what="COCO captions file")
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        rows = [(files[a["image_id"]], a["caption"].strip()) for a in data["annotations"]]
    except (KeyError, TypeError, AttributeError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else "a field has the wrong type"
        raise UserError(
            f"{path} is not a COCO captions file ({why}); expected 'images' (id, file_name) and 'annotations' "
            "(image_id, caption)"
        ) from None
    return _nonempty(path, rows)


def parse_scenes_spec(spec: str) -> tuple[str, int]:
    """``scenes:SPLIT[:N]`` -> (split, size); N >= 1 (default: unlimited for train, 1,000 otherwise)."""
    parts = spec.split(":")
    split = parts[1] if len(parts) > 1 else "train"
    if split not in sc.SPLIT_SEEDS or len(parts) > 3:
        raise UserError(
            f"unknown scenes data {spec!r}; use scenes:train, scenes:val or scenes:calib, "
            "optionally with a size (scenes:val:500)"
        )
    if len(parts) < 3:
        return split, UNLIMITED if split == "train" else SCENES_VAL_SIZE
    size = parts[2]
    if not size.isdigit() or not 1 <= int(size) < UNLIMITED:  # isdigit: no sign, no spaces, no 1e3
        raise UserError(
            f"bad scenes size {size!r} in {spec!r}: the number of pairs must be a positive integer, e.g. scenes:val:500"
        )
    return split, int(size)


def check_spec(spec: str, what: str = "data") -> None:
    """The syntax of a data spec, checked without reading anything (recipes call it at load time): scenes
    specs must parse; otherwise a .csv/.tsv/.txt list, a COCO captions .json, WebDataset shards (a .tar, a
    brace pattern of them, or a folder of them) or a folder of images with caption sidecars."""
    from .shards import expand_shards, is_shard_spec

    if not spec:
        raise UserError(f"{what} is empty; use scenes:train / scenes:val, a CSV/TSV or a COCO captions JSON")
    if spec.startswith("scenes:"):
        parse_scenes_spec(spec)
    elif is_shard_spec(spec):
        expand_shards(spec)  # refuses URLs webdataset would fetch or run (unless the command line allowed them)
    elif Path(spec).is_dir():
        return  # read (and every shard checked) when the stage starts
    elif Path(spec).suffix.lower() not in (".json", ".csv", ".tsv", ".txt"):
        raise UserError(
            f"{what} {spec!r} is not a data spec: expected scenes:train / scenes:val[:N], a .csv/.tsv "
            "file, a COCO captions .json, WebDataset shards (.tar, a {000..009}.tar pattern or a "
            "folder of them) or a folder of images with .txt captions"
        )


def open_source(
    spec: str,
    *,
    image_size: int = 64,
    csv_image_key: str = CSV_IMAGE_KEY,
    csv_caption_key: str = CSV_CAPTION_KEY,
    csv_separator: str | None = None,
    image_root: str | None = None,
) -> PairSource:
    if spec.startswith("scenes:"):
        split, size = parse_scenes_spec(spec)
        src = ScenesSource(split, size, image_size)
        src.finite = size != UNLIMITED
        return src
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"data file not found: {spec} (use a CSV/TSV, a COCO captions JSON, or scenes:train / scenes:val)"
        )
    if path.is_dir():  # images with caption sidecars (shard folders are recognised before this, by the runner)
        from .folder import folder_rows

        return FileSource(str(path), folder_rows(path), Path(image_root) if image_root else path)
    if path.suffix.lower() == ".json":
        rows = _read_coco(path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        rows = _read_csv(path, csv_image_key, csv_caption_key, csv_separator)
    else:
        raise UserError(f"unsupported data file {spec}: expected .csv, .tsv or a COCO captions .json")
    if not rows:
        raise UserError(f"{spec} lists no image-caption pairs")
    root = Path(image_root) if image_root else path.parent
    return FileSource(str(path), rows, root)


def check_readable(src: PairSource, probe: int = 16) -> None:
    """Fail fast when none of `probe` evenly spaced images can be read (wrong paths, wrong column)."""
    if isinstance(src, ScenesSource):
        return
    n = len(src)
    k = min(probe, n)
    idx = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    errors = []
    for i in idx:
        try:
            src[i]
            return
        except UnreadableImage as e:
            errors.append(str(e))
    raise UserError(
        f"none of the {len(idx)} images checked in {src.name} could be read (first: {errors[0]}); "
        "check the image paths, data.image_root and data.csv_image_key"
    )
