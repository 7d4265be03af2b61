"""Reading a teacher-embedding cache (MobileCLIP's "reinforced data"): a stage that reads it never runs
its teacher. ``tinyclip-edge data cache-teacher`` writes it (compress/teacher_cache.py).

Layout of a cache folder:
    cache.json              format, teacher (spec and hash), data hash, augmentation seed, logit scale,
                            the preprocessing and tokenizer the embeddings were made with
    <shard stem>.safetensors  per shard: "image" and "text" [n, E] (L2-normalised, float32); the
                            metadata "keys" lists the n sample keys of the shard in order

The cache is keyed by (teacher hash, data hash, augmentation seed): ``check`` refuses a cache made by
another teacher, for other data, or with another preprocessing, each with one clear line.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.errors import UserError
from ..common.io import read_json

CACHE_META = "cache.json"
CACHE_FORMAT = "tinyclip-edge-teacher-cache"


def sample_id(url: str, key: str) -> str:
    """The id of a shard sample: shard file name + key (stable for given data; the augmentation seeds on it)."""
    return f"{Path(url).name}/{key}"


@dataclass
class TeacherCache:
    root: Path
    meta: dict[str, Any]
    _open: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        root = Path(path)
        meta = read_json(root / CACHE_META, "teacher cache")
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise UserError(
                f"{root} is not a teacher cache (no {CACHE_FORMAT} {CACHE_META}); "
                "make one with `tinyclip-edge data cache-teacher TEACHER SHARDS --out DIR`"
            )
        return cls(root, meta)

    @property
    def aug_seed(self) -> int | None:
        return self.meta.get("aug_seed")

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])

    def check(self, teacher_hash: str, data_hash: str, preprocess: dict[str, Any], tokenizer: dict[str, Any]) -> None:
        m = self.meta
        if m["teacher_hash"] != teacher_hash:
            raise UserError(
                f"teacher cache {self.root} was made by another teacher ({m.get('teacher')}, hash "
                f"{m['teacher_hash'][:12]}) than this stage's (hash {teacher_hash[:12]}); rebuild it with "
                "`tinyclip-edge data cache-teacher` for this teacher, or drop teacher_cache"
            )
        if m["data_hash"] != data_hash:
            raise UserError(
                f"teacher cache {self.root} was made for other data (hash {m['data_hash'][:12]}, "
                f"data.train has {data_hash[:12]}); rebuild it for these shards"
            )
        if m.get("preprocess") != preprocess or m.get("tokenizer") != tokenizer:
            raise UserError(
                f"teacher cache {self.root} was made with another image preprocessing or tokenizer than "
                "this stage's student uses; rebuild it"
            )

    def _shard(self, shard: str) -> dict[str, Any]:
        if shard not in self._open:
            from safetensors import safe_open

            path = self.root / f"{Path(shard).stem}.safetensors"
            if not path.is_file():
                raise UserError(f"teacher cache {self.root} has no embeddings for shard {shard}; rebuild it")
            with safe_open(str(path), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                self._open[shard] = {
                    "rows": {k: i for i, k in enumerate(keys)},
                    "image": f.get_tensor("image"),
                    "text": f.get_tensor("text"),
                }
            while len(self._open) > 4:  # readers stream shards in turn: a few open ones suffice
                self._open.popitem(last=False)
        return self._open[shard]

    def lookup(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher image and text embeddings [n, E] of samples given by ``sample_id``."""
        img, txt = [], []
        for sid in ids:
            shard, key = sid.split("/", 1)
            entry = self._shard(shard)
            if key not in entry["rows"]:
                raise UserError(f"teacher cache {self.root} has no sample {sid}; rebuild it for these shards")
            r = entry["rows"][key]
            img.append(entry["image"][r])
            txt.append(entry["text"][r])
        dim = int(self.meta["embed_dim"])
        if not img:
            return torch.zeros(0, dim), torch.zeros(0, dim)
        return torch.stack(img), torch.stack(txt)
