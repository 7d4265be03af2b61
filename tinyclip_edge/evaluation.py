"""Evaluation of a CLIP (teacher or student) on image-caption data.

- Retrieval, both directions: R@1/5/10 and mAP. A caption is relevant to every image it was written
  for; identical caption strings count as the same caption (procedural captions can repeat).
- Zero-shot classification (when the data has class labels, like scenes): top-1/top-5 with the
  averaged embeddings of several prompt templates per class.
- Compositional accuracy (when the data has hard negatives): how often an image is closer to its
  caption than to the same caption with attributes or the relation swapped.
- Agreement with a teacher: mean embedding cosine (when the embedding sizes match) and how often the
  top-1 retrieval result is the same.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import embeddings as E
from .common.errors import UserError
from .data.pairs import ReadStats, read_pairs
from .data.sources import PairSource, ScenesSource, open_source
from .models.package import ClipPackage

log = logging.getLogger("tinyclip_edge")


@dataclass
class Embedded:
    images: np.ndarray  # [Ni, E], normalised
    texts: np.ndarray  # [Nt, E], normalised
    text_image: np.ndarray  # [Nt] index of the image each text belongs to
    captions: list[str]
    labels: np.ndarray | None = None  # [Ni] class index or -1
    negatives: np.ndarray | None = None  # [Ni, E] embedding of each image's hard-negative caption
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _batched(fn, items: list, batch_size: int, desc: str) -> np.ndarray:
    outs = []
    quiet = len(items) <= 4 * batch_size or not sys.stderr.isatty()
    for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False, disable=quiet):
        outs.append(fn(items[i : i + batch_size]))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed(
    pkg: ClipPackage,
    source: PairSource,
    batch_size: int = 256,
    max_pairs: int | None = None,
    device: str | torch.device = "cpu",
) -> Embedded:
    model = pkg.model.to(device).eval()
    tok = pkg.tokenizer()
    n = len(source) if max_pairs is None else min(len(source), max_pairs)
    keys: dict[str, int] = {}
    images, captions, text_image, labels, negatives = [], [], [], [], []
    stats = ReadStats()
    for pair in read_pairs(source, range(n), stats):
        if pair.key not in keys:
            keys[pair.key] = len(images)
            images.append(pkg.preprocess(pair.image))
            labels.append(int(pair.extra.get("label", -1)))
            negatives.append(pair.extra.get("negative"))
        captions.append(pair.caption)
        text_image.append(keys[pair.key])
    if stats.skipped:  # said on the terminal: metrics over fewer pairs than the data lists must not look complete
        log.warning(
            "eval on %s: dropped %d of %d pair(s) whose image could not be read (e.g. %s)",
            source.name,
            stats.skipped,
            n,
            stats.examples[0],
        )
    if not images:
        raise UserError(
            f"no readable image-caption pairs in {source.name}: all {n} dropped"
            + (f" (e.g. {stats.examples[0]})" if stats.examples else "")
        )

    def enc_img(batch: list) -> np.ndarray:
        x = torch.from_numpy(np.stack(batch)).to(device)
        return model.encode_image(x, normalize=True).float().cpu().numpy()

    def enc_txt(batch: list[str]) -> np.ndarray:
        ids = torch.from_numpy(tok(batch)).to(device)
        return model.encode_text(ids, normalize=True).float().cpu().numpy()

    out = Embedded(
        _batched(enc_img, images, batch_size, "images"),
        _batched(enc_txt, captions, batch_size, "texts"),
        np.asarray(text_image),
        captions,
        np.asarray(labels),
        skipped=stats.skipped,
    )
    if all(neg is not None for neg in negatives):
        out.negatives = _batched(enc_txt, negatives, batch_size, "negatives")
    if isinstance(source, ScenesSource):
        classes, templates = source.class_names(), source.templates()
        prompts = [t.format(c) for c in classes for t in templates]
        out.extra["class_embeddings"] = E.class_embeddings(
            _batched(enc_txt, prompts, batch_size, "prompts"), len(classes)
        )
    return out


def _relevance(e: Embedded) -> np.ndarray:
    """[Ni, Nt] boolean: text t is a correct caption for image i (same string as one of its captions)."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(e.captions))}
    cap_id = np.array([ids[c] for c in e.captions])
    owns = np.zeros((len(e.images), len(ids)), bool)
    owns[e.text_image, cap_id] = True
    return owns[:, cap_id]


def _rank_metrics(sim: np.ndarray, rel: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Rows are queries. R@K: a relevant item in the top K. mAP: mean average precision over relevant items."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(rel, order, axis=1)
    out = {f"R@{k}": float(hits[:, :k].any(1).mean() * 100) for k in ks}
    cum = np.cumsum(hits, axis=1)
    ranks = np.arange(1, hits.shape[1] + 1)
    ap = (hits * cum / ranks).sum(1) / np.maximum(1, hits.sum(1))
    out["mAP"] = float(ap.mean() * 100)
    return out


def metrics(e: Embedded) -> dict[str, Any]:
    sim = e.images @ e.texts.T
    rel = _relevance(e)
    res: dict[str, Any] = {"pairs": len(e.captions), "images": len(e.images), "skipped": e.skipped}
    res["i2t"] = _rank_metrics(sim, rel)
    res["t2i"] = _rank_metrics(sim.T, rel.T)
    if e.negatives is not None:
        pos = sim[e.text_image, np.arange(len(e.captions))]
        first = np.unique(e.text_image, return_index=True)[1]  # one positive caption per image
        neg = (e.images * e.negatives).sum(-1)
        res["compositional_acc"] = float((pos[first] > neg[e.text_image[first]]).mean() * 100)
    if "class_embeddings" in e.extra and e.labels is not None and (e.labels >= 0).any():
        mask = e.labels >= 0
        logits = e.images[mask] @ e.extra["class_embeddings"].T
        top = np.argsort(-logits, axis=1)[:, :5]
        y = e.labels[mask][:, None]
        res["zero_shot"] = {
            "top1": float((top[:, :1] == y).any(1).mean() * 100),
            "top5": float((top == y).any(1).mean() * 100),
            "images": int(mask.sum()),
        }
    return res


def agreement(student: Embedded, teacher: Embedded) -> dict[str, float]:
    out: dict[str, float] = {}
    if student.images.shape[1] == teacher.images.shape[1]:
        out["image_cosine"] = float(E.row_cosine(student.images, teacher.images).mean())
        out["text_cosine"] = float(E.row_cosine(student.texts, teacher.texts).mean())
    for name, (query, keys) in {"i2t": ("images", "texts"), "t2i": ("texts", "images")}.items():
        s_top = E.retrieval_predictions(getattr(student, query), getattr(student, keys))
        t_top = E.retrieval_predictions(getattr(teacher, query), getattr(teacher, keys))
        out[f"{name}_top1_agreement"] = 100 * E.agreement(s_top, t_top)
    return out


def embed_spec(
    pkg: ClipPackage,
    data: str,
    *,
    batch_size: int = 256,
    max_pairs: int | None = None,
    device: str | torch.device = "cpu",
    data_options: dict[str, Any] | None = None,
) -> Embedded:
    src = open_source(data, image_size=pkg.preprocess.image_size, **(data_options or {}))
    return embed(pkg, src, batch_size, max_pairs, device)


def evaluate(
    pkg: ClipPackage, data: str, *, teacher: ClipPackage | Embedded | None = None, **kw: Any
) -> dict[str, Any]:
    """Metrics of `pkg` on `data` (a source spec), plus agreement with `teacher` (a package, or its
    embeddings of the same data when evaluating several students against one teacher)."""
    e = embed_spec(pkg, data, **kw)
    res = {"data": data, "params": pkg.model.num_params(), **metrics(e)}
    if teacher is not None:
        te = teacher if isinstance(teacher, Embedded) else embed_spec(teacher, data, **kw)
        if not isinstance(teacher, Embedded):
            res["teacher"] = {"params": teacher.model.num_params(), **metrics(te)}
        res["agreement"] = agreement(e, te)
    return res


def table_row(name: str, res: dict[str, Any], teacher_params: int | None = None) -> dict[str, Any]:
    p = res["params"]["total"]
    row = {
        "model": name,
        "params": f"{p / 1e6:.2f}M" if p >= 1e5 else f"{p / 1e3:.0f}K",
        "% teacher": f"{100 * p / teacher_params:.0f}%" if teacher_params else "",
        "i2t R@1": f"{res['i2t']['R@1']:.1f}",
        "t2i R@1": f"{res['t2i']['R@1']:.1f}",
        "i2t R@5": f"{res['i2t']['R@5']:.1f}",
        "mAP": f"{(res['i2t']['mAP'] + res['t2i']['mAP']) / 2:.1f}",
    }
    if "zero_shot" in res:
        row["zero-shot top1"] = f"{res['zero_shot']['top1']:.1f}"
    if "compositional_acc" in res:
        row["compositional"] = f"{res['compositional_acc']:.1f}"
    if "agreement" in res:
        row["top1 agree"] = f"{res['agreement']['i2t_top1_agreement']:.1f}"
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
