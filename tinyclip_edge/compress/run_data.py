"""Where a run's batches come from: the recipe's data section on this device, for a stage's training, its
calibration batches and its teacher-embedding cache (compress/runner.py's Run holds one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..common import dist
from ..common.errors import UserError
from ..data.arrays import PrerenderedBatches
from ..data.batches import TrainBatches
from ..data.shards import ShardBatches, check_reader_split, check_shards, data_hash, expand_shards, is_shard_spec
from ..data.sources import check_readable, open_source
from ..data.teacher_cache import TeacherCache
from ..models import ClipPackage
from .recipe import Recipe, StageCfg
from .stages import get_method


class RunData:
    def __init__(self, recipe: Recipe, device: torch.device, run_dir: Path) -> None:
        self.recipe, self.device, self.run_dir = recipe, device, run_dir

    @property
    def workers(self) -> int:
        d = self.recipe.data.workers
        return d if d is not None else (6 if self.device.type == "cuda" else 0)

    def check_shard_split(self) -> None:
        """Shards must feed every reader, evenly over the processes (`data.shards.check_reader_split`), checked
        here before the run writes anything; the data loader checks the same again."""
        spec = self.recipe.data.train
        if is_shard_spec(spec):
            urls, _ = check_shards(expand_shards(spec))
            check_reader_split(len(urls), dist.world_size(), self.workers)

    def batches(
        self,
        ref: ClipPackage,
        spec: str,
        batch_size: int,
        seed: int,
        cache: TeacherCache | None = None,
        *,
        train: bool = False,
    ) -> TrainBatches:
        """A stage's batches from `spec`; `train`: the training batches (pre-rendered with the run's data
        workers when data.prerender asks, uint8 to normalise on the device), else calibration batches."""
        d = self.recipe.data
        if is_shard_spec(spec) and train and d.prerender:
            raise UserError(
                "data.prerender reads a CSV/COCO/scenes source into memory; shards stream instead: "
                "drop data.prerender (or set it to null) for shard data"
            )
        if is_shard_spec(spec):  # WebDataset shards: streamed, split per rank and per worker
            return ShardBatches(
                spec, ref.preprocess, ref.tokenizer(), batch_size, seed, dist.rank(), dist.world_size(), cache=cache
            )
        src = self._pair_source(spec, ref)
        if train and d.prerender:  # uint8 arrays rendered once, held on the training device (data/arrays.py)
            if self.recipe.dclip is not None:
                raise UserError(
                    "data.prerender keeps pixels and captions only, but DCLIP needs each pair's regions; "
                    "drop data.prerender for a recipe with dclip:"
                )
            return PrerenderedBatches(
                src,
                ref.preprocess,
                ref.tokenizer(),
                batch_size,
                seed,
                size=d.prerender,
                device=self.device,
                workers=self.workers,
                rank=dist.rank(),
                world=dist.world_size(),
            )
        on_device = d.normalize_on == "device" or (d.normalize_on == "auto" and self.device.type == "cuda")
        return TrainBatches(
            src,
            ref.preprocess,
            ref.tokenizer(),
            batch_size,
            seed,
            dist.rank(),
            dist.world_size(),
            uint8=train and on_device,
        )

    def _pair_source(self, spec: str, ref: ClipPackage) -> Any:
        """The recipe's pairs from `spec` (CSV/COCO/scenes), checked readable, with regions for DCLIP."""
        d = self.recipe.data
        src = open_source(
            spec,
            image_size=ref.preprocess.image_size,
            csv_image_key=d.csv_image_key,
            csv_caption_key=d.csv_caption_key,
            csv_separator=d.csv_separator,
            image_root=d.image_root,
        )
        check_readable(src)
        if self.recipe.dclip is not None:  # DCLIP: every pair carries its regions (meta teacher and its students)
            from .stages.dclip.regions import region_source

            src = region_source(src, self.recipe.dclip, self.run_dir)
        return src

    def teacher_cache(self, st: StageCfg, teacher: ClipPackage | None, ref: ClipPackage) -> TeacherCache | None:
        """The stage's teacher-embedding cache, checked against its teacher, data and preprocessing."""
        if not st.teacher_cache or st.teacher == "none":  # scratch baselines train without any teacher
            return None
        from ..models.resolve import weights_digest

        if not is_shard_spec(self.recipe.data.train):
            raise UserError(
                f"stage {st.name}: teacher_cache needs data.train to be the shards it was made from "
                f"(e.g. 'shards/{{000000..000099}}.tar'), not {self.recipe.data.train}"
            )
        if teacher is None:
            raise UserError(f"stage {st.name}: teacher_cache needs the stage's teacher to check the cache against")
        cache = TeacherCache.open(st.teacher_cache)
        urls, _ = check_shards(expand_shards(self.recipe.data.train))
        cache.check(
            weights_digest(teacher.model),
            data_hash(urls),
            ref.preprocess.to_dict(),
            ref.tokenizer_cfg,
            embed_dim=teacher.shape.embed_dim,
        )
        return cache

    def calib(self, source: ClipPackage, st: StageCfg, micro: int) -> list[dict]:
        n = get_method(st.method).calib_batches(st)
        if not n:
            return []
        cb = self.batches(
            source, self.recipe.data.calib or self.recipe.data.train, min(64, micro), self.recipe.seed + 1_000_003
        )
        cb.rank, cb.world = 0, 1  # every rank ranks importance on the same (whole) batches
        return [cb[i] for i in range(n)]
