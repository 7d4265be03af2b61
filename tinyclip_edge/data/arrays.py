"""Training data as pre-rendered / pre-decoded uint8 arrays, and normalisation on the training device.

Rendering a 224-px scene or decoding a JPEG costs milliseconds of CPU per sample
(benchmarks/results/data-cpu.md), which a GPU step of a few hundred samples outruns. Two remedies:

- ``uint8`` batches (``data.normalize_on: device``): loader processes only render/decode and resize;
  pixels travel as uint8 (a quarter of float32's bytes) and ``to_device_images`` normalises them on the
  device with the same float32 operations as ``Preprocess.normalize``, so the model sees identical inputs
  (bit for bit on the CPU; tested).
- ``PrerenderedBatches`` (``data.prerender: N``): the first N pairs of the training source are rendered or
  decoded ONCE, in parallel, into one ``[N, H, W, 3]`` uint8 array (and their captions tokenised into
  ``[N, context]``), kept on the training device (150 KB per 224-px image: 20,000 pairs = 3 GB). Batch k is
  then a gather of rows chosen exactly as ``TrainBatches`` chooses them for a finite source (a fresh
  seeded shuffle every epoch), so the data loop costs nothing on the host. For a finite source with
  N ≥ its length the batches equal ``TrainBatches``' (tested). For the unlimited ``scenes:train`` the model
  then sees N distinct scenes, repeated, instead of a stream of new ones: that changes the data, which is
  why it is an option and not a default.

No random augmentation is applied on the device: the scenes captions state positions ("to the left
of"), so flips or crops would make captions false; file sources follow open_clip's eval transform
(resize + centre crop), as the host path does.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer
from .batches import TrainBatches, collate
from .sources import PairSource

log = logging.getLogger("tinyclip_edge")


def to_device_images(images: torch.Tensor, preprocess: Preprocess | None, device: torch.device) -> torch.Tensor:
    """A batch's images on ``device`` as the model's float32 NCHW input.

    Float batches (normalised on the host) are only moved. uint8 ``[B, H, W, 3]`` batches are normalised on
    the device: ``(x / 255 - mean) / std`` in float32, step by step as ``Preprocess.normalize`` does."""
    with torch.profiler.record_function("data: to device"):
        x = images.to(device, non_blocking=True)
        if x.dtype != torch.uint8:
            return x
        if preprocess is None:
            raise ValueError("uint8 images need the preprocessing's mean and std to be normalised")
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format) / 255.0
        mean, std = _stats(tuple(preprocess.mean), tuple(preprocess.std), x.device)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Mean and std as [1, 3, 1, 1] float32 tensors on `device`, made once: a fresh host-to-device copy
    every step would be a synchronisation point."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std))


@dataclass
class _Pool:
    """The finite stand-in source TrainBatches.indices sees: N pairs, shuffled per epoch."""

    name: str
    size: int
    finite: bool = True

    def __len__(self) -> int:
        return self.size


class _Chunks(torch.utils.data.Dataset):
    """Chunk c of the pairs to pre-render, as a uint8 batch (built in loader processes)."""

    def __init__(
        self, source: PairSource, offset: int, n: int, chunk: int, preprocess: Preprocess, tokenizer: Tokenizer
    ):
        self.source, self.offset, self.n, self.chunk = source, offset, n, chunk
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def __getitem__(self, c: int) -> dict[str, Any]:
        lo = self.offset + c * self.chunk
        idx = list(range(lo, min(self.offset + self.n, lo + self.chunk)))
        return collate(self.source, idx, self.preprocess, self.tokenizer, uint8=True)


class PrerenderedBatches(TrainBatches):
    """``TrainBatches`` over N pairs rendered/decoded once into uint8 arrays held on ``device``."""

    in_memory = True

    def __init__(
        self,
        source: PairSource,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int = 0,
        *,
        size: int,
        device: torch.device | str = "cpu",
        workers: int = 0,
        chunk: int = 256,
        rank: int = 0,
        world: int = 1,
    ):
        n = min(size, len(source)) if source.finite else size
        # an unlimited source: the same far-away stretch TrainBatches would stream for this seed
        offset = 0 if source.finite else seed * 2**40
        images, ids, captions, skipped = [], [], [], 0
        loader = torch.utils.data.DataLoader(
            _Chunks(source, offset, n, chunk, preprocess, tokenizer), batch_size=None, num_workers=workers
        )
        for b in loader:
            images.append(b["images"])
            ids.append(b["ids"])
            captions += b["captions"]
            skipped += b["skipped"]
        if skipped:
            log.warning("pre-rendering %s: skipped %d unreadable image(s)", source.name, skipped)
        if not captions:
            from ..common.errors import UserError

            raise UserError(f"data.prerender: no readable pair among the first {n} of {source.name}")
        super().__init__(
            _Pool(f"{source.name} (pre-rendered {len(captions)})", len(captions)),
            preprocess,
            tokenizer,
            batch_size,
            seed,
            rank,
            world,
            uint8=True,
        )
        self.device = torch.device(device)
        self.images = torch.cat(images).to(self.device)
        self.ids = torch.cat(ids).to(self.device)
        self.captions = captions
        self.bytes = self.images.numel() + self.ids.numel() * self.ids.element_size()

    def __getitem__(self, step: int) -> dict[str, Any]:
        idx = self.rank_indices(step)  # under torchrun: this rank's slice of the global batch
        sel = torch.as_tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)
        return {
            "images": self.images.index_select(0, sel),
            "ids": self.ids.index_select(0, sel),
            "captions": [self.captions[i] for i in idx],
            "keys": [f"{self.source.name}/{i}" for i in idx],
            "skipped": 0,
            "skip_examples": [],
        }
