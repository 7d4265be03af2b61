"""DCLIP's region-aware meta teacher: the frozen CLIP teacher plus ONE bidirectional cross-attention block.

For a batch of image-caption pairs:

- region tokens r_0..r_K: r_0 the whole image's embedding, r_1.. the teacher's image embeddings of the
  region crops (boxes from ``data/regions.py``, cut from the input with ``roi_align`` and resized to the
  tower's input size);
- span tokens s_0..s_M: s_0 the whole caption's embedding, s_1.. the teacher's text embeddings of the
  caption's spans (``data/spans.py``'s rule-based chunker);
- one block, multi-head attention (8 heads, or the largest divisor of the embedding width below 8) at the
  embedding width, each direction with a residual connection and LayerNorm:
      S' = LN(S + Attn(S -> R)),   R' = LN(R + Attn(R -> S))
- region weights w_i ∝ area_i · confidence_i · max(0, max_j cos(r_i, s_j)), normalised (spans: uniform);
  pooling: mean = Σ w_i x_i, a_i = softmax_i(cos(x_i, mean) / 2.0), pooled = Σ a_i x_i;
- enriched global embeddings: t̃I = normalise(r_0 + P_I pooled(R')), t̃T = normalise(s_0 + P_T pooled(S')),
  with the output projections P_I, P_T initialised to zero, so the untrained meta teacher IS the teacher.

Only the block and its projections train (``MetaTask``, InfoNCE at temperature 0.05 through the ``clip``
loss with ``scale: 20``). Saved as the teacher's model directory plus ``meta_head.safetensors`` and
``meta_head.json``: ``tinyclip-edge info / eval`` read it as the plain teacher; ``load_meta_teacher`` adds the head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....common.errors import UserError
from ....common.io import atomic_path, atomic_write_json, read_json
from ....common.tokenizers import tokenizer_from_config
from ....data.spans import caption_spans
from ....models import ClipModel, ClipPackage, ClipShape, load_model_dir, save_model_dir
from ...tasks import StageTask, register_task

HEAD_WEIGHTS, HEAD_CONFIG = "meta_head.safetensors", "meta_head.json"


@dataclass
class HeadCfg:
    dim: int
    heads: int = 8
    max_regions: int = 6
    max_spans: int = 6
    pool_temperature: float = 2.0


def _heads_for(dim: int, wanted: int) -> int:
    return max(h for h in range(1, wanted + 1) if dim % h == 0)


class _Attention(nn.Module):
    """Multi-head attention of queries x over keys/values y (own projections, SDPA; no nn.MultiheadAttention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, y: Tensor, y_valid: Tensor) -> Tensor:
        B, N, D = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(B, -1, h, D // h).transpose(1, 2)

        mask = y_valid[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(y)), split(self.v(y)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, N, D))


class CrossBlock(nn.Module):
    def __init__(self, cfg: HeadCfg):
        super().__init__()
        heads = _heads_for(cfg.dim, cfg.heads)
        self.span_to_region, self.region_to_span = _Attention(cfg.dim, heads), _Attention(cfg.dim, heads)
        self.ln_span, self.ln_region = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.proj_image, self.proj_text = (
            nn.Linear(cfg.dim, cfg.dim, bias=False),
            nn.Linear(cfg.dim, cfg.dim, bias=False),
        )
        nn.init.zeros_(self.proj_image.weight)  # untrained: the meta teacher's embeddings are the teacher's
        nn.init.zeros_(self.proj_text.weight)

    def forward(self, spans: Tensor, s_valid: Tensor, regions: Tensor, r_valid: Tensor) -> tuple[Tensor, Tensor]:
        s = self.ln_span(spans + self.span_to_region(spans, regions, r_valid))
        r = self.ln_region(regions + self.region_to_span(regions, spans, s_valid))
        return s, r


def attention_pool(x: Tensor, valid: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """mean = Σ w_i x_i (w over valid tokens); a = softmax(cos(x_i, mean) / T) over valid tokens; Σ a_i x_i."""
    w = weights * valid
    w = w / w.sum(1, keepdim=True).clamp_min(1e-9)
    mean = (w[..., None] * x).sum(1, keepdim=True)
    logits = F.cosine_similarity(x, mean, dim=-1) / temperature
    a = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
    return (a[..., None] * x).sum(1)


def _pad(rows: list[Tensor], dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    n = max(len(r) for r in rows)
    out = torch.zeros(len(rows), n, dim, device=device)
    valid = torch.zeros(len(rows), n, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    return out, valid


class MetaTeacher(nn.Module):
    def __init__(self, clip: ClipModel, tokenizer_cfg: dict[str, Any], cfg: HeadCfg):
        super().__init__()
        self.clip, self.cfg, self.tokenizer_cfg = clip, cfg, tokenizer_cfg
        self.head = CrossBlock(cfg)
        self._tok = tokenizer_from_config(tokenizer_cfg)
        self.clip.requires_grad_(False)

    @property
    def shape(self) -> ClipShape:
        return self.clip.shape

    @property
    def embed_dim(self) -> int:
        return self.clip.shape.embed_dim

    def train(self, mode: bool = True) -> MetaTeacher:
        super().train(mode)
        self.clip.eval()  # the teacher is frozen, also in train mode
        return self

    @torch.no_grad()
    def tokens(self, images: Tensor, ids: Tensor, batch: dict[str, Any]) -> tuple[Tensor, ...]:
        """The frozen teacher's side: (region tokens, valid, weights, span tokens, valid, global image, text)."""
        clip, dev = self.clip, images.device
        g_img, g_txt = clip.encode_image(images, True), clip.encode_text(ids, True)
        B, S = len(images), images.shape[-1]
        regions = batch.get("regions") or [None] * B
        boxes, counts, area_conf = [], [], []
        for i, r in enumerate(regions):
            bx = (r or {}).get("boxes") or []
            sc = (r or {}).get("scores") or [1.0] * len(bx)
            bx, sc = bx[: self.cfg.max_regions], sc[: self.cfg.max_regions]
            counts.append(len(bx))
            for b, c in zip(bx, sc):
                boxes.append([i, *(v * S for v in b)])
                area_conf.append((b[2] - b[0]) * (b[3] - b[1]) * c)
        crops_emb = torch.zeros(0, self.embed_dim, device=dev)
        if boxes:
            from torchvision.ops import roi_align

            rois = torch.tensor(boxes, dtype=images.dtype, device=dev)
            crops = roi_align(images, rois, output_size=(S, S), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            crops_emb = clip.encode_image(crops, True).float()
        captions = batch.get("captions") or [""] * B
        spans = [caption_spans(c, self.cfg.max_spans) for c in captions]
        flat = [s for row in spans for s in row]
        span_emb = clip.encode_text(torch.from_numpy(self._tok(flat)).to(dev), True).float() if flat else None
        r_rows, s_rows, w_rows, pos_r, pos_s = [], [], [], 0, 0
        for i in range(B):
            s_i = (
                torch.cat([g_txt[i : i + 1].float(), span_emb[pos_s : pos_s + len(spans[i])]])
                if flat
                else g_txt[i : i + 1]
            )
            pos_s += len(spans[i])
            r_i = torch.cat([g_img[i : i + 1].float(), crops_emb[pos_r : pos_r + counts[i]]])
            ac = torch.tensor([1.0] + area_conf[pos_r : pos_r + counts[i]], device=dev)
            pos_r += counts[i]
            best = (r_i @ s_i.T).max(1).values.clamp_min(0)
            w_rows.append(ac * best + 1e-6)
            r_rows.append(r_i)
            s_rows.append(s_i)
        R, r_valid = _pad(r_rows, self.embed_dim, dev)
        Sx, s_valid = _pad(s_rows, self.embed_dim, dev)
        W, _ = _pad([w[:, None] for w in w_rows], 1, dev)
        return R, r_valid, W[..., 0], Sx, s_valid, g_img.float(), g_txt.float()

    def forward_batch(self, batch: dict[str, Any], images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Enriched, normalised image and text embeddings and the teacher's logit scale."""
        R, r_valid, W, S, s_valid, g_img, g_txt = self.tokens(images, ids, batch)
        s2, r2 = self.head(S, s_valid, R, r_valid)
        T = self.cfg.pool_temperature
        img = F.normalize(g_img + self.head.proj_image(attention_pool(r2, r_valid, W, T)), dim=-1)
        txt = F.normalize(g_txt + self.head.proj_text(attention_pool(s2, s_valid, s_valid.float(), T)), dim=-1)
        return img, txt, self.clip.logit_scale.exp()

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise UserError("the DCLIP meta teacher needs the batch's captions and regions; call forward_batch")


# ---------------------------------------------------------------------------------------- training


@register_task("dclip-meta")
class MetaTask(StageTask):
    """Fine-tunes the head only; the wrapped teacher stays frozen."""

    wants_batch = True

    def __init__(self, meta: MetaTeacher):
        super().__init__(meta)  # type: ignore[arg-type]

    def encode(self, images: Tensor, ids: Tensor, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        raise UserError("the DCLIP meta teacher trains on batches with captions and regions")

    def encode_batch(
        self, batch: dict[str, Any], images: Tensor, ids: Tensor, step: int, micro: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.forward_batch(batch, images, ids)

    def optimizers(self, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
        groups = [{"params": list(self.model.head.parameters()), "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
        if self.objective is not None:
            groups += self.objective.param_groups(cfg.lr, cfg.weight_decay)
        return [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)]

    def clip_parameters(self) -> list[Tensor]:
        extra = list(self.objective.parameters()) if self.objective is not None else []
        return list(self.model.head.parameters()) + extra

    def after_step(self, step: int) -> dict[str, float]:
        if self.objective is not None:
            self.objective.clamp_()
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta.update({"tokenizer": self.model.tokenizer_cfg, "head": asdict(self.model.cfg)})
        return meta

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], cfg: Any) -> MetaTask:
        clip = ClipModel(ClipShape.from_dict(meta["shape"]))
        return cls(MetaTeacher(clip, meta["tokenizer"], HeadCfg(**meta["head"])))


def new_meta_teacher(teacher: ClipPackage, cfg: HeadCfg, seed: int) -> MetaTeacher:
    torch.manual_seed(seed)  # the head's initial weights are a function of the stage's seed
    return MetaTeacher(copy.deepcopy(teacher.model), teacher.tokenizer_cfg, cfg)


# ---------------------------------------------------------------------------------------- files


def save_meta_teacher(pkg: ClipPackage, path: str | Path) -> Path:
    """The teacher's model directory plus the head (safetensors) and its config (JSON), written atomically."""
    from safetensors.torch import save_file

    meta = pkg.model
    assert isinstance(meta, MetaTeacher)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_model_dir(pkg.with_model(meta.clip, meta_teacher=True), tmp)
        head = {k: v.detach().cpu().contiguous() for k, v in meta.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_WEIGHTS), metadata={"format": "tinyclip-edge/dclip-meta-head"})
        atomic_write_json(
            tmp / HEAD_CONFIG,
            {"format": "tinyclip-edge/dclip-meta-head", "format_version": 1, "head": asdict(meta.cfg)},
        )
    return path


def is_meta_teacher_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file() and (Path(path) / HEAD_WEIGHTS).is_file()


def load_meta_teacher(path: str | Path) -> ClipPackage:
    """A ClipPackage whose model is the MetaTeacher (teacher + trained head)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_meta_teacher_dir(path):
        raise UserError(
            f"{path} is not a DCLIP meta-teacher directory (no {HEAD_CONFIG} / {HEAD_WEIGHTS}); "
            "it is written by a stage with method: dclip-meta"
        )
    pkg = load_model_dir(path)
    cfg = read_json(path / HEAD_CONFIG, "meta-teacher head config")
    try:
        head_cfg = HeadCfg(**cfg["head"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path / HEAD_CONFIG} is not a meta-teacher head config ({e})") from None
    meta = MetaTeacher(pkg.model, pkg.tokenizer_cfg, head_cfg)
    meta.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    return ClipPackage(meta, pkg.preprocess, pkg.tokenizer_cfg, pkg.provenance, path)  # type: ignore[arg-type]
