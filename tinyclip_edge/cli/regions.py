"""`tinyclip-edge regions`: detect image regions once per dataset for DCLIP's meta teacher."""

from __future__ import annotations

import click

from ..data.limits import MAX_REGIONS
from ..data.sources import CSV_CAPTION_KEY, CSV_IMAGE_KEY

COMMANDS: list[click.Command] = []


@click.command("regions")
@click.argument("data")
@click.option(
    "--detector",
    required=True,
    help="A YOLO model .yaml, or ultralytics detection weights (.pt: a pickle, needs --trust-detector).",
)
@click.option(
    "--trust-detector",
    is_flag=True,
    help="Allow a pickled .pt detector (unpickling runs any code the file holds: only files you trust).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write regions.jsonl.")
@click.option(
    "--confidence",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Detection confidence threshold, in [0, 1].",
)
@click.option(
    "--max-regions",
    default=6,
    show_default=True,
    type=click.IntRange(1, MAX_REGIONS),
    help=f"Keep at most this many boxes per image (1..{MAX_REGIONS}).",
)
@click.option("--image-root", help="Image paths in DATA are relative to this (default: DATA's folder).")
@click.option("--csv-image-key", default=CSV_IMAGE_KEY, show_default=True)
@click.option("--csv-caption-key", default=CSV_CAPTION_KEY, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False), help="Detection cache (default: the user cache).")
def regions_cmd(
    data: str,
    detector: str,
    trust_detector: bool,
    out: str,
    confidence: float,
    max_regions: int,
    image_root: str | None,
    csv_image_key: str,
    csv_caption_key: str,
    cache: str | None,
) -> None:
    """Detect regions in every image of DATA (a CSV/TSV, a COCO captions JSON, or scenes:val) with a YOLO
    detector; write one JSON line per image (key, sha256, boxes, scores, classes) for dclip.regions=OUT.
    Results are cached by image content, so a second pass over the same images detects nothing again."""
    from pathlib import Path

    from ..data import check_readable, open_source
    from ..data.optin import opted_in
    from ..data.regions import detect_regions

    src = open_source(
        data, image_size=224, csv_image_key=csv_image_key, csv_caption_key=csv_caption_key, image_root=image_root
    )
    check_readable(src)
    with opted_in(trust_detector=trust_detector):
        rep = detect_regions(
            src, detector, out, confidence=confidence, max_regions=max_regions, cache=Path(cache) if cache else None
        )
    click.echo(f"regions: {rep.summary()}; wrote {out}")


COMMANDS.append(regions_cmd)
