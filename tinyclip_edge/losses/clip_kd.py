"""CLIP-KD's distillation objectives (Yang et al., CVPR 2024): FD, ICL and CRD.

Notation (the toolkit's, see docs/ARCHITECTURE.md "Losses"): sI, sT the student's normalised image /
text embeddings; tI, tT the teacher's, constants. For FD and ICL, which compare student vectors with
teacher vectors, sI and sT first pass through the objective's learned student->teacher projection when the
embedding widths differ (``DistillOutputs.s_image_t``). CRD compares two B x B relation matrices and uses
the student's own embeddings. CE and KL are defined in ``losses/functional.py``.

CLIP-KD's best recipe is task + CRD + ICL + 2000·FD (the MSE of unit vectors is tiny, so FD's weight matters);
recipes weight them (``losses: {clip: 1, crd: 1, icl: 1, fd: 2000}``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .functional import ce_diag, kl_rows
from .registry import DistillOutputs, Learned, register_loss


@register_loss("fd", cross_model=True)
def fd_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Feature distillation: ``MSE(sI, tI) + MSE(sT, tT)``, each an element-wise mean. Zero when student = teacher."""
    t_img, t_txt = out.teacher("fd")
    return {"fd": F.mse_loss(out.s_image_t.float(), t_img) + F.mse_loss(out.s_text_t.float(), t_txt)}


@register_loss("icl", learned={"kappa": Learned(exp=True)}, cross_model=True)
def icl_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Interactive contrastive learning: ``½[CE(κ·sI tTᵀ) + CE(κ·sT tIᵀ)]``, student images against teacher
    texts and student texts against teacher images.

    κ is learnable and log-parameterised like CLIP's own temperature (κ = exp(p), p initialised to
    ln(1/0.07), so κ starts at 14.3; clamped to at most 100). It has a cross-entropy floor: when
    student = teacher it equals the teacher's own contrastive loss at scale κ.
    """
    t_img, t_txt = out.teacher("icl")
    kappa = out.scale("icl", "kappa")
    s_img, s_txt = out.s_image_t.float(), out.s_text_t.float()
    return {"icl": (ce_diag(kappa * s_img @ t_txt.T) + ce_diag(kappa * s_txt @ t_img.T)) / 2}


@register_loss("crd")
def crd_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Contrastive relational distillation: ``½[KL(τs·sI sTᵀ ‖ τt·tI tTᵀ) + KL(τs·sT sIᵀ ‖ τt·tT tIᵀ)]`` with each
    model's own logit scale (τs the student's, learnable; τt the teacher's). TinyCLIP's affinity mimicking up to
    the temperature and the use of KL instead of soft cross-entropy (same gradient, but zero at student = teacher).
    """
    t_img, t_txt = out.teacher("crd")
    assert out.teacher_logit_scale is not None
    tau_t = out.teacher_logit_scale.detach().float()
    s_logits = out.student_logit_scale.float() * out.student_image.float() @ out.student_text.float().T
    t_logits = tau_t * t_img @ t_txt.T
    return {"crd": (kl_rows(s_logits, t_logits) + kl_rows(s_logits.T, t_logits.T)) / 2}
