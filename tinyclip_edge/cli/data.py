"""`tinyclip-edge data ...`: build WebDataset shards, cache teacher embeddings."""

from __future__ import annotations

import logging

import click

from ..data.limits import CACHE_BATCH, IMAGE_SIZES
from ..data.sources import CSV_CAPTION_KEY, CSV_IMAGE_KEY

COMMANDS: list[click.Command] = []


@click.group("data")
def data() -> None:
    """Prepare training data at scale: tar shards and teacher-embedding caches."""


COMMANDS.append(data)


@data.command("build")
@click.argument("source")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards (must not exist or be empty)."
)
@click.option("--shard-size", default=10000, show_default=True, help="Samples per shard.")
@click.option(
    "--image-size",
    default=64,
    show_default=True,
    type=click.IntRange(*IMAGE_SIZES),
    help="Render size of scenes:* sources, in pixels.",
)
@click.option("--csv-image-key", default=CSV_IMAGE_KEY, show_default=True)
@click.option("--csv-caption-key", default=CSV_CAPTION_KEY, show_default=True)
@click.option("--csv-separator", default=None)
@click.option("--image-root", default=None, help="Image paths are relative to this (default: the list's folder).")
def build(
    source: str,
    out: str,
    shard_size: int,
    image_size: int,
    csv_image_key: str,
    csv_caption_key: str,
    csv_separator: str | None,
    image_root: str | None,
) -> None:
    """Write deterministic WebDataset shards from SOURCE: a CSV/TSV, a COCO captions JSON, a folder of images
    with .txt caption sidecars, or scenes:SPLIT:N. Train on them with data.train='OUT/{000000..00000K}.tar'."""
    from ..data.build import build_shards

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    rep = build_shards(
        source,
        out,
        shard_size,
        image_size=image_size,
        csv_image_key=csv_image_key,
        csv_caption_key=csv_caption_key,
        csv_separator=csv_separator,
        image_root=image_root,
    )
    last = len(rep.shards) - 1
    click.echo(
        f"wrote {rep.samples} pairs in {len(rep.shards)} shard(s) to {out}"
        + (f", skipped {rep.skipped} unreadable image(s)" if rep.skipped else "")
        + f"; data.train='{out.rstrip('/')}/{{{0:06d}..{last:06d}}}.tar'"
    )


@data.command("cache-teacher")
@click.argument("teacher")
@click.argument("shards")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the cache.")
@click.option(
    "--aug-seed", type=int, default=None, help="Fixed augmentation seed (default: none, plain preprocessing)."
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(*CACHE_BATCH))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def cache_teacher(teacher: str, shards: str, out: str, aug_seed: int | None, batch_size: int, device: str) -> None:
    """Store TEACHER's embeddings of every sample of SHARDS (a folder or brace pattern of .tar files) in OUT;
    a stage with teacher_cache=OUT then reads them instead of running the teacher."""
    from ..common.devices import check_device
    from ..compress.cache_teacher import build_teacher_cache
    from ..compress.teacher import resolve_teacher

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    check_device(device)  # before the teacher is resolved (which may train a built-in one)
    meta = build_teacher_cache(
        resolve_teacher(teacher), teacher, shards, out, aug_seed=aug_seed, batch_size=batch_size, device=device
    )
    click.echo(
        f"cached {meta['samples']} pairs of {len(meta['shards'])} shard(s) in {out} "
        f"(teacher {meta['teacher_hash'][:12]}, data {meta['data_hash'][:12]}, aug seed {aug_seed})"
    )
