"""Writing a teacher-embedding cache: ``tinyclip-edge data cache-teacher TEACHER SHARDS --out DIR``.

Every sample of every shard, in order, gets the teacher's normalised image embedding (of the sample's
fixed augmentation for ``--aug-seed``; none by default) and text embedding, computed with the teacher's
own preprocessing and tokenizer. A stage with ``teacher_cache: DIR`` then reads them instead of running
the teacher (data/teacher_cache.py documents the layout and the checks). The whole folder is written to
a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..common.errors import UserError
from ..common.io import atomic_path, atomic_write_json
from ..data.augment import fixed_crop
from ..data.shards import _decode, check_shards, data_hash, expand_shards
from ..data.teacher_cache import CACHE_FORMAT, CACHE_META, sample_id
from ..models import ClipModel, ClipPackage


def teacher_hash(model: ClipModel) -> str:
    """sha256 over the teacher's parameter names, shapes, dtypes and values: identifies its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    import webdataset as wds
    from tqdm.auto import tqdm

    urls, bad = check_shards(expand_shards(shards))
    if bad:
        raise UserError(
            f"a teacher cache must cover every shard, but {len(bad)} cannot be read (e.g. {bad[0]}); "
            "fix or rebuild them first"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; remove it or choose another --out")
    model = teacher.model.to(device).eval()
    tok, pre = teacher.tokenizer(), teacher.preprocess
    meta = {
        "format": CACHE_FORMAT,
        "version": 1,
        "teacher": teacher_spec,
        "teacher_hash": teacher_hash(teacher.model),
        "data_hash": data_hash(urls),
        "aug_seed": aug_seed,
        "embed_dim": teacher.shape.embed_dim,
        "logit_scale": float(model.logit_scale.exp()),
        "preprocess": pre.to_dict(),
        "tokenizer": teacher.tokenizer_cfg,
        "shards": [Path(u).name for u in urls],
        "samples": 0,
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        bar = tqdm(desc="cache-teacher", unit="pair", disable=not progress, mininterval=0.5)

        def embed(pending: list[tuple[np.ndarray, str]], img_rows: list, txt_rows: list) -> None:
            if not pending:
                return
            images = torch.from_numpy(np.stack([p[0] for p in pending])).to(device)
            ids = torch.from_numpy(tok([p[1] for p in pending])).to(device)
            i, t, _ = model(images, ids)
            img_rows.append(i.float().cpu())
            txt_rows.append(t.float().cpu())
            bar.update(len(pending))
            pending.clear()

        for url in urls:
            keys, img_rows, txt_rows, pending = [], [], [], []
            for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                try:
                    image, caption, _, _ = _decode(sample)
                except Exception as e:  # the trainer skips it too; the cache simply has no row for it
                    bar.write(f"skipped {url}:{sample.get('__key__')}: {e}")
                    continue
                sid = sample_id(url, sample["__key__"])
                keys.append(sample["__key__"])
                pending.append((pre(fixed_crop(image, aug_seed, sid)), caption))
                if len(pending) == batch_size:
                    embed(pending, img_rows, txt_rows)
            embed(pending, img_rows, txt_rows)
            dim = meta["embed_dim"]
            tensors = {
                "image": torch.cat(img_rows) if img_rows else torch.zeros(0, dim),
                "text": torch.cat(txt_rows) if txt_rows else torch.zeros(0, dim),
            }
            save_file(tensors, str(tmp / f"{Path(url).stem}.safetensors"), metadata={"keys": json.dumps(keys)})
            meta["samples"] += len(keys)
        bar.close()
        atomic_write_json(tmp / CACHE_META, meta)
    return meta
