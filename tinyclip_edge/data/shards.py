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
from urllib.parse import urlparse

import numpy as np
import torch

from ..common.errors import UserError
from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer
from .augment import fixed_crop
from .optin import OPT_INS
from .teacher_cache import TeacherCache, sample_id

log = logging.getLogger("tinyclip_edge")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
OWN_SCHEMES = ("scenes:",)  # data names of ours that look like URLs but are never handed to webdataset


def url_scheme(url: str) -> str:
    """The scheme webdataset's gopen would dispatch `url` on ('' for a local file; '-' is its stdin)."""
    if url == "-":
        return "-"
    try:
        return urlparse(url).scheme
    except ValueError:  # a malformed URL (e.g. an unclosed IPv6 bracket) is not a local path either
        return "?"


def is_remote(url: str) -> bool:
    """True for anything webdataset would not open as a plain local file: pipe:, http(s):, s3:, gs:, ais:..."""
    return bool(url_scheme(url))


def check_local(url: str, spec: str | None = None) -> str:
    """`url`, refused when webdataset would fetch it or run it as a command, unless the command line
    allowed remote data. Every shard URL goes through here (`expand_shards`) before webdataset sees it."""
    scheme = url_scheme(url)
    if scheme and not OPT_INS.remote_data:
        where = f" (from {spec!r})" if spec is not None and spec != url else ""
        raise UserError(
            f"data shard {url!r}{where} is a '{scheme}:' URL, which webdataset would fetch or run as a "
            "command; tinyclip-edge reads local shard files only, unless you pass --allow-remote-data on "
            "the command line (a recipe cannot allow it). For a local path containing ':', write it as ./PATH"
        )
    return url


def is_shard_spec(spec: str) -> bool:
    """A tar shard, a brace pattern of shards, a directory of *.tar files, or a URL (refused unless allowed)."""
    if spec.startswith(OWN_SCHEMES):
        return False
    if is_remote(spec):
        return True
    if "{" in spec and ".tar" in spec:
        return True
    path = Path(spec)
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a spec: brace expansion (``shards/{000000..000999}.tar``), or a directory's *.tar."""
    import braceexpand

    if not is_remote(spec) and Path(spec).is_dir():
        # a glob's names are local files: './' keeps a name with ':' from reading as a URL scheme
        urls = sorted(str(p) if not is_remote(str(p)) else f"./{p}" for p in Path(spec).glob("*.tar"))
    else:
        urls = list(braceexpand.braceexpand(spec))
    if not urls:
        raise UserError(f"'{spec}' names no shards; use e.g. shards/{{000000..000099}}.tar or a folder of .tar files")
    return [check_local(u, spec) for u in urls]


def check_shards(urls: list[str]) -> tuple[list[str], list[str]]:
    """(readable, problems): local shards that are missing or not a tar are skipped and counted.

    Remote URLs cannot be probed cheaply; they are kept and a failure while streaming is counted then.
    A clear error when none is readable.
    """
    good, bad = [], []
    for url in urls:
        if is_remote(url):  # allowed on the command line (expand_shards refused it otherwise)
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
            bad.append(f"{url}: corrupt ({'; '.join(str(e).split()) or type(e).__name__})")  # one line
    if not good:
        raise UserError(
            f"none of the {len(urls)} shard(s) could be read (first: {bad[0]}); "
            "check the data.train pattern, or rebuild them with `tinyclip-edge data build`"
        )
    if bad:
        log.warning("skipping %d of %d shard(s) that are missing or corrupt (e.g. %s)", len(bad), len(urls), bad[0])
    return good, bad


def shard_digests(urls: list[str]) -> list[str]:
    """The sha256 of each shard's own bytes, in order (cached while the file is unchanged: inode, size,
    mtime, ctime). Never what a manifest beside them claims: replaced shards are other data."""
    from ..common.integrity import sha256_file

    for u in urls:
        if is_remote(u):
            raise UserError(f"cannot hash remote shard {u}; copy the shards locally to build or check a teacher cache")
    return [sha256_file(u) for u in urls]


def data_hash(urls: list[str]) -> str:
    """sha256 over the shards' sha256s, in order: what identifies the data for the teacher cache (for a
    complete build it equals the data_hash of the build's manifest.json, which is not read)."""
    import hashlib

    return hashlib.sha256("".join(shard_digests(urls)).encode()).hexdigest()


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


class Unusable(ValueError):
    """A shard sample the trainer cannot use; the message says why."""


def decode_sample(sample: dict[str, Any]) -> tuple[Any, str, str, dict[str, Any]]:
    """(PIL image, caption, key, extra) of a raw sample; raises `Unusable` saying which field is missing
    or unreadable. The one judge of a sample: the trainer, the probe and cache-teacher all call it."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        others = sorted(k for k in sample if not k.startswith("__") and k not in ("txt", "json"))
        raise Unusable(
            f"no image ({'/'.join(IMAGE_EXTS)})" + (f"; it has {', '.join('.' + o for o in others)}" if others else "")
        )
    if "txt" not in sample:
        raise Unusable("no .txt caption")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            im.load()
            image = im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise Unusable(f".{ext} image cannot be decoded ({type(e).__name__}: {str(e)[:80]})") from None
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Unusable(".txt caption is not UTF-8") from None
    if not caption:
        raise Unusable("the .txt caption is empty")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, RecursionError):
        raise Unusable(".json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise Unusable(".json is not an object")
    return image, caption, str(meta.get("key", sample["__key__"])), meta


def first_usable(urls: list[str]) -> None:
    """Refuse shards in which no sample is usable, naming each shard and why, before any step trains.

    Reads samples in order until the first usable one: one sample for good data. Where none is, every
    shard was read to the end and the error counts, per shard, what was wrong."""
    import webdataset as wds

    report = []
    for url in urls:
        skips, n, reasons = _Skips(), 0, {}
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=skips)):
            n += 1
            try:
                decode_sample(sample)
                return
            except Unusable as e:
                reasons[str(e)] = reasons.get(str(e), 0) + 1
        why = ", ".join(f"{c} x {r}" for r, c in reasons.items())
        if skips.events:
            why += ("; " if why else "") + f"unreadable tar ({skips.events[0]})"
        report.append(f"{url}: {n} sample(s), none usable" + (f" ({why})" if why else ""))
    raise UserError(
        f"no usable sample in the {len(urls)} shard(s) of the data: {'; '.join(report[:3])}"
        + (f"; and {len(report) - 3} more" if len(report) > 3 else "")
        + ". A sample needs an image (.jpg/.png/.webp/.bmp) and a non-empty UTF-8 .txt caption; "
        "rebuild the shards with `tinyclip-edge data build`"
    )


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
        if not any(is_remote(u) for u in self.urls):
            first_usable(self.urls)
        # a cached sample is found by its shard's content, wherever the shard lies (the cache's key)
        self.shard_ids = dict(zip(self.urls, shard_digests(self.urls))) if cache is not None else {}
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
                image, caption, key, meta = decode_sample(sample)
            except Unusable as e:
                skipped.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {e}")
                continue
            url = sample.get("__url__", "")
            sid = sample_id(self.shard_ids.get(url, url), sample["__key__"])
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
