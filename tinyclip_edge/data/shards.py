"""Training batches streamed from WebDataset tar shards (``data.train='shards/{000000..000999}.tar'``).

A shard is a tar of samples grouped by key: ``KEY.jpg|png|webp`` (the image, original bytes),
``KEY.txt`` (the caption) and optionally ``KEY.json`` (``{"key": original id, "boxes": [[x0,y0,x1,y1], ...]}``).
``tinyclip-edge data build`` writes them (data/build.py); any WebDataset with those fields works.

The stream (webdataset's own pipeline stages):
- epoch e visits every shard once, in an order shuffled from (seed, e);
- the shards are split per rank (``wds.split_by_node``) and then per data worker (``wds.split_by_worker``),
  so every reader streams whole shards sequentially, nothing is read twice;
- each reader shuffles samples through a buffer (``wds.shuffle``) seeded from (seed, epoch, rank, worker);
- a batch is the next `batch_size` samples of one reader; unreadable images are dropped and counted, and
  shards that are missing or corrupt are skipped and counted (a clear error when none is readable).

Resumable position. The trainer restarts at micro-batch m = step × grad_accum; the DataLoader takes
batches from its workers in turn, so reader w had produced ceil((m - w) / workers) batches: it skips
that many batches of raw samples (without decoding them) and goes on. With the same number of processes
and workers the resumed stream is exactly the uninterrupted one. With another number, the position is
still m × global micro-batch samples (global samples), spread over the new readers: the run continues
at the same point of the data, though the samples of the current epoch come in another order.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.errors import UserError
from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer
from .augment import fixed_crop
from .teacher_cache import TeacherCache, sample_id

log = logging.getLogger("tinyclip_edge")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")


def is_shard_spec(spec: str) -> bool:
    """A tar shard, a brace pattern of shards, or a directory of *.tar files."""
    if spec.startswith(REMOTE):
        return True
    if "{" in spec and ".tar" in spec:
        return True
    path = Path(spec)
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a spec: brace expansion (``shards/{000000..000999}.tar``), or a directory's *.tar."""
    import braceexpand

    if not spec.startswith(REMOTE) and Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        urls = list(braceexpand.braceexpand(spec))
    if not urls:
        raise UserError(f"'{spec}' names no shards; use e.g. shards/{{000000..000099}}.tar or a folder of .tar files")
    return urls


def check_shards(urls: list[str]) -> tuple[list[str], list[str]]:
    """(readable, problems): local shards that are missing or not a tar are skipped and counted.

    Remote URLs cannot be probed cheaply; they are kept and a failure while streaming is counted then.
    A clear error when none is readable.
    """
    good, bad = [], []
    for url in urls:
        if url.startswith(REMOTE):
            good.append(url)
            continue
        try:
            with tarfile.open(url) as tf:  # reads the first header only: cheap for any shard size
                if tf.next() is None:
                    raise tarfile.ReadError("empty archive")
            good.append(url)
        except FileNotFoundError:
            bad.append(f"{url}: missing")
        except (tarfile.TarError, OSError, EOFError) as e:
            bad.append(f"{url}: corrupt ({e})")
    if not good:
        raise UserError(
            f"none of the {len(urls)} shard(s) could be read (first: {bad[0]}); "
            "check the data.train pattern, or rebuild them with `tinyclip-edge data build`"
        )
    if bad:
        log.warning("skipping %d of %d shard(s) that are missing or corrupt (e.g. %s)", len(bad), len(urls), bad[0])
    return good, bad


def data_hash(urls: list[str]) -> str:
    """sha256 over the shards' sha256s, in order: what identifies the data for the teacher cache.

    Per-shard hashes come from a ``manifest.json`` beside the shards (data build writes it) where it lists
    the shard, else from reading the file; for a complete build this equals the manifest's data_hash.
    """
    import hashlib

    known: dict[str, str] = {}
    for parent in {Path(u).parent for u in urls if not u.startswith(REMOTE)}:
        man = parent / "manifest.json"
        if man.is_file():
            try:
                known.update({str(parent / e["name"]): e["sha256"] for e in json.loads(man.read_text())["shards"]})
            except (ValueError, KeyError, TypeError):
                pass  # not ours: hash the files
    parts = []
    for u in urls:
        if str(Path(u)) in known:
            parts.append(known[str(Path(u))])
            continue
        if u.startswith(REMOTE):
            raise UserError(f"cannot hash remote shard {u}; copy the shards locally to build or check a teacher cache")
        h = hashlib.sha256()
        with open(u, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        parts.append(h.hexdigest())
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def check_reader_split(shards: int, world: int, workers: int) -> None:
    """Every reader (process x data worker) streams whole shards, and every reader yields batches at the
    same rate: too few shards leave a reader without data, and an uneven split makes the shards of the
    readers holding fewer come round more often. Too few, or uneven over the processes: an error; uneven
    over one process's data workers only: a warning (the default of 6 workers on CUDA would refuse most
    shard counts)."""
    readers = world * max(1, workers)
    if shards < readers:
        raise UserError(
            f"{shards} readable shard(s) cannot feed {world} process(es) x {max(1, workers)} data worker(s); "
            "write more, smaller shards (data build --shard-size) or lower data.workers"
        )
    if shards % world:
        raise UserError(
            f"{shards} readable shard(s) do not split evenly over {world} processes: the samples of the processes "
            f"holding fewer would be seen more often; write a multiple of {world} shards (data build "
            f"--shard-size) or run a number of processes that divides {shards}"
        )
    if (shards // world) % max(1, workers):
        log.warning(
            "%d shard(s) per process do not split evenly over %d data workers: the shards of the workers holding "
            "fewer are seen more often; set data.workers to a divisor of %d",
            shards // world,
            workers,
            shards // world,
        )


class _Skips:
    """webdataset error handler: count the failure (a corrupt shard or member) and continue."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.events.append(" ".join(str(a) for a in exn.args)[:200] or type(exn).__name__)
        return True


def _decode(sample: dict[str, Any]) -> tuple[Any, str, str, dict[str, Any]]:
    """(PIL image, caption, key, extra) of a raw sample; raises ValueError when a field is missing/unreadable."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no image or no .txt caption")
    with Image.open(io.BytesIO(sample[ext])) as im:
        im.load()
        image = im.convert("RGB")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return image, sample["txt"].decode("utf-8").strip(), str(meta.get("key", sample["__key__"])), meta


class ShardBatches(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of this rank's training batches from WebDataset shards."""

    finite = False

    def __init__(
        self,
        spec: str,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        cache: TeacherCache | None = None,
    ):
        self.spec, self.cache = spec, cache
        # a stage reading cached teacher embeddings sees the very augmentation they were made with
        self.augment_seed = cache.aug_seed if cache is not None else None
        self.urls, self.bad = check_shards(expand_shards(spec))
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.start, self.workers = 0, 1
        self._head: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- the stream of one reader
    def _samples(self, worker: int, workers: int, skips: _Skips) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        for epoch in itertools.count():
            order = list(self.urls)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            # the split of wds.split_by_node + wds.split_by_worker, with the reader's ROLE instead of the
            # DataLoader's worker id (they differ after a resume) and no dependence on the environment
            mine = order[self.rank :: self.world][worker::workers]
            pipe = wds.DataPipeline(
                wds.SimpleShardList(mine),
                wds.tarfile_to_samples(handler=skips),
                wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng),
            )
            got = False
            for sample in pipe:
                got = True
                yield sample
            if not got:
                raise UserError(
                    f"reader {worker} of rank {self.rank} found no readable sample in its share of "
                    f"{len(self.urls)} shard(s); write more, smaller shards (data build --shard-size) "
                    "or use fewer data.workers"
                )

    def _batch(self, raw: list[dict[str, Any]], skips: _Skips) -> dict[str, Any]:
        images, captions, keys, boxes, ids_, skipped = [], [], [], [], [], list(skips.events)
        skips.events.clear()
        for sample in raw:
            try:
                image, caption, key, meta = _decode(sample)
            except Exception as e:  # PIL raises many types for broken images
                skipped.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {e}")
                continue
            sid = sample_id(sample.get("__url__", ""), sample["__key__"])
            images.append(self.preprocess(fixed_crop(image, self.augment_seed, sid)))
            captions.append(caption)
            keys.append(key)
            boxes.append(meta.get("boxes"))
            ids_.append(sid)
        if images:
            image_t, ids = torch.from_numpy(np.stack(images)), torch.from_numpy(self.tokenizer(captions))
        else:
            image_t = torch.zeros(0, 3, self.preprocess.image_size, self.preprocess.image_size)
            ids = torch.zeros(0, self.tokenizer.context_length, dtype=torch.int64)
        batch = {
            "images": image_t,
            "ids": ids,
            "captions": captions,
            "keys": keys,
            "boxes": boxes,
            "sample_ids": ids_,
            "skipped": len(skipped),
            "skip_examples": skipped[:3],
        }
        if self.cache is not None:
            batch["teacher_image"], batch["teacher_text"] = self.cache.lookup(ids_)
            batch["teacher_logit_scale"] = torch.tensor(self.cache.logit_scale)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # this reader plays the role reader (start + worker) % workers had when batch `start` was reached
        role = (self.start + worker) % workers
        done = (self.start - role + workers - 1) // workers if self.start > role else 0
        skips = _Skips()
        stream = self._samples(role, workers, skips)
        for _ in itertools.islice(stream, done * self.batch_size):  # skip raw samples: no decoding
            pass
        skips.events.clear()  # failures while skipping were counted before the interruption
        while True:
            yield self._batch(list(itertools.islice(stream, self.batch_size)), skips)

    # ---------------------------------------------------------------- what the trainer and runner call
    def loader(self, start: int, stop: int, workers: int = 0) -> Iterator[dict[str, Any]]:
        """Batches start..stop-1 of this rank, read by `workers` processes (0: in this process)."""
        self.start, self.workers = start, max(1, workers)
        check_reader_split(len(self.urls), self.world, self.workers)
        dl = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None
        )
        yield from itertools.islice(dl, stop - start)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Batch i of the whole stream as one reader sees it (calibration batches for importance)."""
        if len(self._head) <= i:
            whole = ShardBatches.__new__(ShardBatches)
            whole.__dict__.update(self.__dict__, rank=0, world=1, start=0, _head=[])
            self._head = list(itertools.islice(iter(whole), i + 1))
        return self._head[i]
