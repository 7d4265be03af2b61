"""Which regions a run's pairs carry (``dclip.regions``), resolved once per run (see data/regions.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from ....common.errors import UserError
from ....data.regions import RegionSource, detect_regions, fallback_count, read_coco_instances, read_regions_jsonl
from ....data.sources import PairSource, ScenesSource
from ...rundir import REGIONS_FILE, RunLayout
from .config import DclipCfg

log = logging.getLogger("tinyclip_edge")
MODES = ("boxes", "grid", "yolo")


def region_source(src: PairSource, cfg: DclipCfg, run_dir: Path) -> RegionSource:
    mode = cfg.regions
    if mode == "grid":
        return RegionSource(src, "grid", max_regions=cfg.max_regions)
    if mode == "boxes":
        if cfg.instances:
            return _lookup(src, read_coco_instances(cfg.instances), cfg, f"COCO instances {cfg.instances}")
        if not isinstance(src, ScenesSource):
            raise UserError(
                f"dclip.regions=boxes needs boxes in the dataset: {src.name} has none; give COCO "
                "instances (dclip.instances=instances.json), detect them (dclip.regions=yolo "
                "dclip.detector=yolo11n.pt), or use dclip.regions=grid"
            )
        return RegionSource(src, "boxes", max_regions=cfg.max_regions)
    if mode == "yolo":
        if not cfg.detector:
            raise UserError("dclip.regions=yolo needs dclip.detector=<YOLO weights, e.g. yolo11n.pt>")
        out = RunLayout(run_dir).path(REGIONS_FILE)  # recorded in the run's marker: --fresh removes it
        if not out.is_file():  # one detection pass per run (and per image, across runs, through the cache)
            rep = detect_regions(src, cfg.detector, out, confidence=cfg.confidence, max_regions=cfg.max_regions)
            log.warning("regions: %s", rep.summary())
        return _lookup(src, read_regions_jsonl(out), cfg, str(out))
    if mode.endswith(".jsonl"):
        return _lookup(src, read_regions_jsonl(mode), cfg, mode)
    raise UserError(f"dclip.regions must be one of {', '.join(MODES)} or a regions .jsonl file, not '{mode}'")


def _lookup(src: PairSource, lookup: dict, cfg: DclipCfg, what: str) -> RegionSource:
    missing, n = fallback_count(src, lookup, probe=None if src.finite else 0)
    if missing:
        log.warning("%d of %d images have no region in %s; they use the whole image", missing, n, what)
    return RegionSource(src, "lookup", lookup, cfg.max_regions)
