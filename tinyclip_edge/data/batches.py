"""Deterministic training batches: batch `step` is a pure function of (source, seed, step).

That makes resume exact (restart at the saved step, get the same batches) and lets a DataLoader build
whole batches in worker processes. Unreadable images are dropped from their batch and counted.

Under torchrun, `batch_size` is the GLOBAL micro-batch: rank r of W builds only its contiguous slice
r of W. The union over ranks is the batch one process would build, whatever W is, so a run resumed
with another number of processes continues with the very same samples (the position is the step).

With ``uint8=True`` a batch carries its images as resized/cropped ``[B, H, W, 3]`` uint8 pixels and the
trainer normalises them on its device (``data/arrays.py::to_device_images``, the same float32 operations as
``Preprocess.normalize``): a quarter of the bytes to copy, and no float work in the loader processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer
from .pairs import ReadStats, read_pairs
from .sources import PairSource


class TrainBatches(torch.utils.data.Dataset):
    def __init__(
        self,
        source: PairSource,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        uint8: bool = False,
    ):
        self.source, self.preprocess, self.tokenizer = source, preprocess, tokenizer
        self.batch_size, self.seed, self.uint8 = batch_size, seed, uint8
        self.rank, self.world = rank, world
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return 2**31 - 1

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        if not self.source.finite:  # unlimited (procedural) data: the seed picks a far-away stretch of it
            start += self.seed * 2**40
            return list(range(start, start + self.batch_size))
        n = len(self.source)
        out = []
        for p in range(start, start + self.batch_size):
            epoch, pos = divmod(p, n)
            if epoch != self._perm_epoch:  # a fresh shuffle every epoch, reproducible from the seed
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=g).numpy(), epoch
            out.append(int(self._perm[pos]))
        return out

    def rank_indices(self, step: int) -> list[int]:
        """This rank's contiguous share of the global batch `step`."""
        idx = self.indices(step)
        share = len(idx) // self.world
        return idx[self.rank * share : (self.rank + 1) * share]

    def __getitem__(self, step: int) -> dict[str, Any]:
        return collate(self.source, self.rank_indices(step), self.preprocess, self.tokenizer, self.uint8)


def collate(
    source: PairSource, indices: list[int], preprocess: Preprocess, tokenizer: Tokenizer, uint8: bool = False
) -> dict[str, Any]:
    """One batch; ``uint8``: images as [B, H, W, 3] uint8 pixels (normalised later, on the device)."""
    images, captions, keys, stats, regions = [], [], [], ReadStats(), []
    for pair in read_pairs(source, indices, stats):
        images.append(np.asarray(preprocess.resize_crop(pair.image)) if uint8 else preprocess(pair.image))
        captions.append(pair.caption)
        keys.append(pair.key)
        regions.append(pair.extra.get("regions"))  # set by data.regions.RegionSource (DCLIP), else None
    if images:
        image_t = torch.from_numpy(np.stack(images))
        ids = torch.from_numpy(tokenizer(captions))
    else:
        size = preprocess.image_size
        image_t = torch.zeros(0, size, size, 3, dtype=torch.uint8) if uint8 else torch.zeros(0, 3, size, size)
        ids = torch.zeros(0, tokenizer.context_length, dtype=torch.int64)
    batch = {
        "images": image_t,
        "ids": ids,
        "captions": captions,
        "keys": keys,
        "skipped": stats.skipped,
        "skip_examples": stats.examples,
    }
    if any(r is not None for r in regions):
        batch["regions"] = regions
    return batch


def batch_loader(
    batches: TrainBatches, start: int, stop: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[dict[str, Any]]:
    """Batches start..stop-1 in order; with workers, built in parallel processes (4 batches ahead per worker).
    ``pin_memory`` (the trainer sets it on CUDA) lets the host-to-device copy run asynchronously.
    Batches already held in memory (``in_memory``: pre-rendered arrays, possibly on the device) are indexed
    directly: no worker processes to start, nothing to pin."""
    if hasattr(batches, "loader"):  # a streaming source (data/shards.py) keeps its own position
        it: Iterator[dict[str, Any]] = iter(batches.loader(start, stop, workers))
    elif getattr(batches, "in_memory", False):
        it = (batches[i] for i in range(start, stop))
    else:
        it = iter(
            torch.utils.data.DataLoader(
                batches,
                batch_size=None,
                sampler=range(start, stop),
                num_workers=workers,
                prefetch_factor=4 if workers else None,
                pin_memory=pin_memory,
            )
        )
    while True:
        with torch.profiler.record_function("data: next batch"):  # what profiles call waiting for data
            batch = next(it, None)
        if batch is None:
            return
        yield batch
