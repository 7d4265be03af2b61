"""``tinyclip-edge data build SOURCE --out shards/ --shard-size N``: WebDataset tar shards from any pair source.

SOURCE is a CSV/TSV, a COCO captions JSON, a folder of images with .txt sidecars, or scenes
(``scenes:train:10000``; the unlimited ``scenes:train`` needs a size). Each sample is written as
``KEY.<image ext>``, ``KEY.txt`` and ``KEY.json`` (``{"key": the source's id, "boxes": ...}`` where the
source has boxes). The image keeps its original bytes when its extension is one the trainer decodes
(``shards.IMAGE_EXTS``: jpg, png, webp, bmp); any other file (``.tif``, ``.gif``, an image named ``.txt``)
is decoded and written as PNG, so the image member never collides with the caption or metadata and every
image written can be read back. Scenes are rendered and PNG-encoded. KEY is the sample's running index
(``000000042``), shards are ``000000.tar``, ``000001.tar``, ...

Deterministic: the same source gives byte-identical shards (fixed order, fixed tar metadata, mtime 0),
so ``manifest.json`` (samples per shard, sha256 of each shard and of all of them: the data hash that the
teacher cache keys on) identifies the data. Unreadable images are skipped and counted. The shards are
written into a temporary sibling folder that is renamed to --out at the end: nothing half-written
(data/staging.py: SIGTERM removes it, a later build removes one a killed build left).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.integrity import sha256_file
from ..common.io import atomic_write_json
from .limits import IMAGE_SIZES
from .shards import IMAGE_EXTS
from .sources import (
    CSV_CAPTION_KEY,
    CSV_IMAGE_KEY,
    UNLIMITED,
    FileSource,
    PairSource,
    UnreadableImage,
    load_image,
    open_source,
)
from .staging import check_new_out, staging_dir

log = logging.getLogger("tinyclip_edge")
MANIFEST = "manifest.json"
FORMAT = "tinyclip-edge-shards"


@dataclass
class BuildReport:
    out: Path
    samples: int = 0
    skipped: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    data_hash: str = ""
    skip_examples: list[str] = field(default_factory=list)


def _sample(src: PairSource, i: int) -> tuple[bytes, str, str, str, dict[str, Any]]:
    """(image bytes, extension, caption, key, json meta) of pair i; UnreadableImage when it cannot be read."""
    if isinstance(src, FileSource):
        rel, caption = src.rows[i]
        path = Path(rel) if os.path.isabs(rel) else src.root / rel
        image = load_image(path)  # raises UnreadableImage: never ship a file no reader can decode
        ext = path.suffix.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        if ext not in IMAGE_EXTS:  # the trainer would never decode it (or it would collide with txt/json)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue(), "png", caption, rel, {"key": rel}
        return path.read_bytes(), ext, caption, rel, {"key": rel}
    pair = src[i]
    buf = io.BytesIO()
    pair.image.save(buf, format="PNG")
    meta: dict[str, Any] = {"key": pair.key}
    if pair.extra.get("boxes") is not None:
        meta["boxes"] = [list(map(float, b)) for b in pair.extra["boxes"]]
    return buf.getvalue(), "png", pair.caption, pair.key, meta


def build_shards(
    spec: str,
    out: str | os.PathLike,
    shard_size: int,
    *,
    image_size: int = 64,
    csv_image_key: str = CSV_IMAGE_KEY,
    csv_caption_key: str = CSV_CAPTION_KEY,
    csv_separator: str | None = None,
    image_root: str | None = None,
    progress: bool = True,
) -> BuildReport:
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, not {shard_size}")
    lo, hi = IMAGE_SIZES
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not lo <= image_size <= hi:
        raise UserError(f"--image-size must be a whole number of pixels in {lo}..{hi}, not {image_size!r}")
    out = Path(out)
    check_new_out(out, "shards")
    src = open_source(
        spec,
        image_size=image_size,
        csv_image_key=csv_image_key,
        csv_caption_key=csv_caption_key,
        csv_separator=csv_separator,
        image_root=image_root,
    )
    if len(src) >= UNLIMITED:
        raise UserError(f"'{spec}' is unlimited; give a size, e.g. {spec}:10000")
    report = BuildReport(out)
    with staging_dir(out) as tmp:
        _write_samples(src, spec, tmp, shard_size, report, progress)
        if report.samples == 0:
            raise UserError(
                f"no readable image in {spec} ({report.skipped} skipped, e.g. "
                f"{report.skip_examples[0] if report.skip_examples else 'none listed'}); nothing written"
            )
        _write_manifest(spec, tmp, shard_size, report)
    if report.skipped:
        log.warning("skipped %d unreadable image(s) (e.g. %s)", report.skipped, report.skip_examples[0])
    return report


def _write_samples(src: Any, spec: str, tmp: Path, shard_size: int, report: BuildReport, progress: bool) -> None:
    """Every readable pair of `src` into tar shards of `shard_size` samples (unreadable ones counted)."""
    import webdataset as wds
    from tqdm.auto import tqdm

    with wds.ShardWriter(
        str(tmp / "%06d.tar"), maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=0.0
    ) as sink:
        for i in tqdm(
            range(len(src)),
            desc=f"data build {Path(spec).name or spec}",
            unit="pair",
            disable=not progress,
            mininterval=0.5,
        ):
            try:
                data, ext, caption, _key, meta = _sample(src, i)
            except UnreadableImage as e:
                report.skipped += 1
                if len(report.skip_examples) < 3:
                    report.skip_examples.append(str(e))
                continue
            sink.write(
                {
                    "__key__": f"{report.samples:09d}",
                    ext: data,
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
            report.samples += 1


def _write_manifest(spec: str, tmp: Path, shard_size: int, report: BuildReport) -> None:
    """The shards' digests into `report` and the folder's manifest."""
    tars = sorted(tmp.glob("*.tar"))
    counts = [min(shard_size, report.samples - k * shard_size) for k in range(len(tars))]
    report.shards = [
        {"name": t.name, "samples": c, "sha256": sha256_file(t, cached=False)} for t, c in zip(tars, counts)
    ]
    report.data_hash = hashlib.sha256("".join(s["sha256"] for s in report.shards).encode()).hexdigest()
    atomic_write_json(
        tmp / MANIFEST,
        {
            "format": FORMAT,
            "version": 1,
            "source": spec,
            "samples": report.samples,
            "skipped": report.skipped,
            "shard_size": shard_size,
            "data_hash": report.data_hash,
            "shards": report.shards,
        },
    )
