"""Writing a teacher-embedding cache (the reader is data/teacher_cache.py): ``tinyclip-edge data cache-teacher TEACHER SHARDS --out DIR``.

Every sample of every shard, in order, gets the teacher's normalised image embedding (of the sample's
fixed augmentation for ``--aug-seed``; none by default) and text embedding, computed with the teacher's
own preprocessing and tokenizer. A stage with ``teacher_cache: DIR`` then reads them instead of running
the teacher (data/teacher_cache.py documents the layout and the checks). The whole folder is written to
a temporary sibling and renamed at the end (data/staging.py: SIGTERM and stale temporaries).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.devices import check_device
from ..common.errors import UserError
from ..common.io import atomic_write_json, save_safetensors
from ..data.augment import fixed_crop
from ..data.limits import CACHE_BATCH
from ..data.shards import Unusable, check_shards, decode_sample, expand_shards, shard_digests
from ..data.staging import check_new_out, staging_dir
from ..data.teacher_cache import CACHE_FORMAT, CACHE_META, CACHE_VERSION, sample_id
from ..models import ClipModel, ClipPackage
from ..models.resolve import weights_digest

log = logging.getLogger("tinyclip_edge")


@torch.no_grad()
def build_teacher_cache(
    teacher: ClipPackage,
    teacher_spec: str,
    shards: str,
    out: str | Path,
    *,
    aug_seed: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    lo, hi = CACHE_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not lo <= batch_size <= hi:
        raise UserError(f"--batch-size must be a whole number in {lo}..{hi}, not {batch_size!r}")
    device = check_device(device)
    out = Path(out)
    check_new_out(out, "teacher cache")
    urls, bad = check_shards(expand_shards(shards))
    if bad:
        raise UserError(
            f"a teacher cache must cover every shard, but {len(bad)} cannot be read (e.g. {bad[0]}); "
            "fix or rebuild them first"
        )
    digests = shard_digests(urls)
    model = teacher.model.to(device).eval()
    tok = teacher.tokenizer()
    meta = _new_meta(teacher, teacher_spec, digests, aug_seed, model)
    examples: list[str] = []
    with staging_dir(out) as tmp:
        bar = tqdm(desc="cache-teacher", unit="pair", disable=not progress, mininterval=0.5)
        embedder = _Embedder(model, tok, teacher.preprocess, device, batch_size, aug_seed, bar)
        done: dict[str, int] = {}  # the same shard bytes twice (copies in two folders): embedded once
        for url, digest in zip(urls, digests):
            if digest not in done:
                done[digest] = embedder.shard(url, digest, tmp, meta, examples)
            meta["shards"].append({"name": Path(url).name, "sha256": digest, "samples": done[digest]})
            meta["samples"] += done[digest]
        bar.close()
        if meta["samples"] == 0:
            raise UserError(
                f"no usable sample in the {len(urls)} shard(s) of {shards} ({meta['unusable']} unusable, e.g. "
                f"{examples[0] if examples else 'the shards hold no sample'}); nothing written"
            )
        atomic_write_json(tmp / CACHE_META, meta)
    if meta["unusable"]:
        log.warning("skipped %d unusable sample(s) (e.g. %s)", meta["unusable"], examples[0])
    return meta


def _new_meta(
    teacher: ClipPackage, teacher_spec: str, digests: list[str], aug_seed: int | None, model: ClipModel
) -> dict[str, Any]:
    """The cache's meta.json before any shard: what it was made from (teacher, data, augmentation)."""
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "teacher": teacher_spec,
        "teacher_hash": weights_digest(teacher.model),
        "data_hash": hashlib.sha256("".join(digests).encode()).hexdigest(),
        "aug_seed": aug_seed,
        "embed_dim": teacher.shape.embed_dim,
        "logit_scale": float(model.logit_scale.exp()),
        "preprocess": teacher.preprocess.to_dict(),
        "tokenizer": teacher.tokenizer_cfg,
        "shards": [],
        "samples": 0,
        "unusable": 0,
    }


class _Embedder:
    """The teacher's embeddings of one shard's samples, in batches, saved as <digest>.safetensors."""

    def __init__(
        self, model: ClipModel, tok: Any, pre: Any, device: Any, batch_size: int, aug_seed: int | None, bar: Any
    ) -> None:
        self.model, self.tok, self.pre, self.device = model, tok, pre, device
        self.batch_size, self.aug_seed, self.bar = batch_size, aug_seed, bar

    def embed(self, pending: list[tuple[np.ndarray, str]], img_rows: list, txt_rows: list) -> None:
        if not pending:
            return
        images = torch.from_numpy(np.stack([p[0] for p in pending])).to(self.device)
        ids = torch.from_numpy(self.tok([p[1] for p in pending])).to(self.device)
        i, t, _ = self.model(images, ids)
        img_rows.append(i.float().cpu())
        txt_rows.append(t.float().cpu())
        self.bar.update(len(pending))
        pending.clear()

    @torch.no_grad()
    def shard(self, url: str, digest: str, tmp: Path, meta: dict[str, Any], examples: list[str]) -> int:
        """Embed and save one shard; the number of usable samples (unusable ones are counted in `meta`)."""
        import webdataset as wds

        keys: list[str] = []
        img_rows: list = []
        txt_rows: list = []
        pending: list[tuple[np.ndarray, str]] = []
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            try:
                image, caption, _, _ = decode_sample(sample)
            except Unusable as e:  # the trainer skips it too; the cache simply has no row for it
                meta["unusable"] += 1
                if len(examples) < 3:
                    examples.append(f"{url}:{sample.get('__key__')}: {e}")
                continue
            sid = sample_id(digest, sample["__key__"])
            keys.append(sample["__key__"])
            pending.append((self.pre(fixed_crop(image, self.aug_seed, sid)), caption))
            if len(pending) == self.batch_size:
                self.embed(pending, img_rows, txt_rows)
        self.embed(pending, img_rows, txt_rows)
        dim = meta["embed_dim"]
        tensors = {
            "image": torch.cat(img_rows) if img_rows else torch.zeros(0, dim),
            "text": torch.cat(txt_rows) if txt_rows else torch.zeros(0, dim),
        }
        save_safetensors(tensors, tmp / f"{digest}.safetensors", metadata={"keys": json.dumps(keys)})
        return len(keys)
