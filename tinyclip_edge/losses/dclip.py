"""DCLIP's student objectives. The teacher embeddings t̃I, t̃T they read are the region-aware meta
teacher's enriched embeddings when the stage's teacher is a meta teacher (``method: dclip-meta``), the
plain teacher's otherwise. Student vectors pass through the objective's student->teacher projection when
the widths differ (``DistillOutputs.s_image_t``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..common.errors import UserError
from .functional import symmetric_infonce
from .registry import DistillOutputs, register_loss


def _cosine_terms(out: DistillOutputs, loss: str) -> Tensor:
    t_img, t_txt = out.teacher(loss)
    s_img, s_txt = out.s_image_t.float(), out.s_text_t.float()
    return (1 - F.cosine_similarity(s_img, t_img, dim=-1)).mean() + (
        1 - F.cosine_similarity(s_txt, t_txt, dim=-1)
    ).mean()


@register_loss("cosine", cross_model=True)
def cosine_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """``(1 − cos(sI, t̃I)) + (1 − cos(sT, t̃T))``, each averaged over the batch. Zero when student = teacher."""
    return {"cosine": _cosine_terms(out, "cosine")}


def check_hybrid(cfg: dict[str, Any]) -> None:
    tau, weight = cfg.get("temperature", 0.05), cfg.get("contrastive", 1.0)
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (tau, weight))
    if not ok or not tau > 0 or not weight >= 0:
        raise UserError(
            f"losses.hybrid: temperature must be a number > 0 and contrastive a number >= 0, got {tau!r} and {weight!r}"
        )


@register_loss("hybrid", options=("temperature", "contrastive"), cross_model=True, check=check_hybrid)
def hybrid_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """DCLIP's student loss: ``(1 − cos(sI, t̃I)) + (1 − cos(sT, t̃T)) + c·InfoNCE_τ(sI, sT)`` with τ = 0.05
    (``temperature``) and c = 1.0 (``contrastive``) by default. InfoNCE_τ is the symmetric contrastive loss of
    the student's own (unprojected) embeddings at the fixed scale 1/τ. When student = teacher the cosine term
    is zero and the loss sits at its floor, the teacher's own InfoNCE_τ.
    """
    check_hybrid(cfg)
    tau, weight = float(cfg.get("temperature", 0.05)), float(cfg.get("contrastive", 1.0))
    return {
        "cosine": _cosine_terms(out, "hybrid"),
        "infonce": weight * symmetric_infonce(out.student_image, out.student_text, 1.0 / tau),
    }
