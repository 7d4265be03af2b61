"""Reading a teacher-embedding cache (MobileCLIP's "reinforced data"): a stage that reads it never runs
its teacher. ``tinyclip-edge data cache-teacher`` writes it (compress/cache_teacher.py).

Layout of a cache folder (version 2):
    cache.json              format, version, teacher (spec and hash), data hash, augmentation seed, logit
                            scale, embedding width, the preprocessing and tokenizer the embeddings were made
                            with, and per shard its sha256 and sample count
    <shard sha256>.safetensors  per distinct shard: "image" and "text" [n, E] (L2-normalised, float32); the
                            metadata "keys" lists the n sample keys of the shard in order

A shard is identified by its content (sha256 of the tar file itself, never of what a manifest says), so
replaced shards are a different key, and two shards that share a name in different folders never share an
entry. ``open`` refuses a cache.json that is malformed or from an unknown version; ``check`` refuses a cache
made by another teacher, for other data, of another width or with another preprocessing; each shard file is
checked when first read (shape, width, finite and normalised rows). Each is one clear line.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.errors import UserError
from ..common.integrity import is_sha256
from ..common.io import open_for_reading, read_json

CACHE_META = "cache.json"
CACHE_FORMAT = "tinyclip-edge-teacher-cache"
CACHE_VERSION = 2
NORM_TOL = 1e-3  # how far a row's L2 norm may be from 1 (float32 rounding is ~1e-7)
MAX_EMBED_DIM = 65536


def sample_id(shard: str, key: str) -> str:
    """The id of a shard sample: its shard's identity (the sha256 of its bytes where a cache is involved)
    and its key. The fixed augmentation is seeded on it, so it must not depend on where the shard lies."""
    return f"{shard}/{key}"


def _bad(root: Path, why: str) -> UserError:
    return UserError(
        f"teacher cache {root} is unusable: {why}; rebuild it with "
        "`tinyclip-edge data cache-teacher TEACHER SHARDS --out DIR`"
    )


def _check_meta(root: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise UserError(
            f"{root} is not a teacher cache (no {CACHE_FORMAT} {CACHE_META}); "
            "make one with `tinyclip-edge data cache-teacher TEACHER SHARDS --out DIR`"
        )
    version = meta.get("version")
    if version != CACHE_VERSION or isinstance(version, bool):
        older = isinstance(version, int) and not isinstance(version, bool) and 0 < version < CACHE_VERSION
        raise _bad(
            root,
            f"cache version {version!r} "
            + ("was written by an older tinyclip-edge (keyed by shard names)" if older else "is unknown")
            + f", this tinyclip-edge reads version {CACHE_VERSION}"
            + ("" if older else " (upgrade tinyclip-edge if a newer one wrote it)"),
        )
    dim, scale, samples = meta.get("embed_dim"), meta.get("logit_scale"), meta.get("samples")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_EMBED_DIM:
        raise _bad(root, f"embed_dim is {dim!r}, not a width in 1..{MAX_EMBED_DIM}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (math.isfinite(scale) and scale > 0):
        raise _bad(root, f"logit_scale is {scale!r}, not a positive finite number")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise _bad(root, f"it holds {samples!r} pairs; a cache must hold at least one")
    for k in ("teacher_hash", "data_hash"):
        if not is_sha256(meta.get(k)):
            raise _bad(root, f"{k} is not a sha256")
    shards = meta.get("shards")
    if (
        not isinstance(shards, list)
        or not shards
        or not all(isinstance(s, dict) and is_sha256(s.get("sha256")) for s in shards)
    ):
        raise _bad(root, "'shards' must list each shard's sha256")
    seed = meta.get("aug_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _bad(root, f"aug_seed is {seed!r}, not an integer or null")


@dataclass
class TeacherCache:
    root: Path
    meta: dict[str, Any]
    _open: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        root = Path(path)
        meta = read_json(root / CACHE_META, "teacher cache")
        _check_meta(root, meta)
        return cls(root, meta)

    @property
    def aug_seed(self) -> int | None:
        return self.meta.get("aug_seed")

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def check(
        self,
        teacher_hash: str,
        data_hash: str,
        preprocess: dict[str, Any],
        tokenizer: dict[str, Any],
        embed_dim: int | None = None,
    ) -> None:
        m = self.meta
        if m["teacher_hash"] != teacher_hash:
            raise UserError(
                f"teacher cache {self.root} was made by another teacher ({m.get('teacher')}, hash "
                f"{m['teacher_hash'][:12]}) than this stage's (hash {teacher_hash[:12]}); rebuild it with "
                "`tinyclip-edge data cache-teacher` for this teacher, or drop teacher_cache"
            )
        if m["data_hash"] != data_hash:
            raise UserError(
                f"teacher cache {self.root} was made for other data (hash {m['data_hash'][:12]}, the shards "
                f"of data.train hash to {data_hash[:12]}); rebuild it for these shards"
            )
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise UserError(
                f"teacher cache {self.root} holds {self.embed_dim}-wide embeddings, but this stage's teacher "
                f"makes {embed_dim}-wide ones; rebuild it for this teacher"
            )
        if m.get("preprocess") != preprocess or m.get("tokenizer") != tokenizer:
            raise UserError(
                f"teacher cache {self.root} was made with another image preprocessing or tokenizer than "
                "this stage's student uses; rebuild it"
            )

    def _read(self, path: Path) -> dict[str, Any]:
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise _bad(self.root, f"{path.name} is missing")
        open_for_reading(path, "teacher cache file")
        try:
            with safe_open(str(path), "pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "null"))
                image, text = f.get_tensor("image"), f.get_tensor("text")
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise _bad(self.root, f"{path.name} is truncated or not a cache file ({why})") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise _bad(self.root, f"{path.name} has no list of distinct sample keys")
        want = (len(keys), self.embed_dim)
        for name, t in (("image", image), ("text", text)):
            if t.dtype != torch.float32 or tuple(t.shape) != want:
                raise _bad(
                    self.root,
                    f"{path.name}: '{name}' is {t.dtype} {tuple(t.shape)}, expected float32 {want} "
                    "(one row per key, the cache's embed_dim)",
                )
            if not torch.isfinite(t).all():
                raise _bad(self.root, f"{path.name}: '{name}' holds NaN or infinite values")
            norms = t.norm(dim=-1)
            if len(norms) and float((norms - 1).abs().max()) > NORM_TOL:
                raise _bad(
                    self.root,
                    f"{path.name}: '{name}' embeddings are not L2-normalised (a row norm is {float(norms.max()):.4g})",
                )
        return {"rows": {k: i for i, k in enumerate(keys)}, "image": image, "text": text}

    def _shard(self, shard: str) -> dict[str, Any]:
        if shard not in self._open:
            if shard not in {s["sha256"] for s in self.meta["shards"]}:
                raise UserError(f"teacher cache {self.root} has no embeddings for shard {shard[:12]}; rebuild it")
            self._open[shard] = self._read(self.root / f"{shard}.safetensors")
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
        if not img:
            return torch.zeros(0, self.embed_dim), torch.zeros(0, self.embed_dim)
        return torch.stack(img), torch.stack(txt)
