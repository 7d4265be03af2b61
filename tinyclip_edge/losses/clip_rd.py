"""CLIP-RD's relational distillation terms, VRD and XRD (from the authors' released loss code; the
paper's equations were not available). They build on CLIP-KD's task + CRD + ICL + 2000·FD.

Student vectors pass through the objective's student->teacher projection when the widths differ
(``DistillOutputs.s_image_t``). The extra scales α_I, α_T (VRD) and κ (XRD) are learnable scalars
initialised to ln(1/0.07) ≈ 2.66 and used as plain multipliers, as in the released code (clamped to
[0, 100]). CE and KL are defined in ``losses/functional.py``; every KL target is detached.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .functional import ce_diag, kl_rows
from .registry import DistillOutputs, Learned, register_loss


@register_loss("vrd", learned={"alpha_image": Learned(), "alpha_text": Learned()}, cross_model=True)
def vrd_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Vertical relational distillation: the teacher<->student relations must be equally strong in both
    modalities. With

        A_ts^I = α_I·tI sIᵀ,  A_st^I = α_I·sI tIᵀ,  A_ts^T = α_T·tT sTᵀ,  A_st^T = α_T·sT tTᵀ

    the terms are

        kl       = ½[KL(A_ts^I ‖ A_ts^T) + KL(A_st^I ‖ A_st^T)]   (image side pulled toward the detached text side)
        ce_image = ½[CE(A_ts^I) + CE(A_st^I)]
        ce_text  = ½[CE(A_ts^T) + CE(A_st^T)]

    all three with the loss's weight. ``kl`` is zero when the image-side and text-side relations are equal;
    the CE terms sit at their floor (the teacher's own relation CE) when student = teacher.
    """
    t_img, t_txt = out.teacher("vrd")
    s_img, s_txt = out.s_image_t.float(), out.s_text_t.float()
    a_i, a_t = out.scale("vrd", "alpha_image"), out.scale("vrd", "alpha_text")
    ts_i, st_i = a_i * t_img @ s_img.T, a_i * s_img @ t_img.T
    ts_t, st_t = a_t * t_txt @ s_txt.T, a_t * s_txt @ t_txt.T
    return {
        "kl": (kl_rows(ts_i, ts_t) + kl_rows(st_i, st_t)) / 2,
        "ce_image": (ce_diag(ts_i) + ce_diag(st_i)) / 2,
        "ce_text": (ce_diag(ts_t) + ce_diag(st_t)) / 2,
    }


@register_loss("xrd", learned={"kappa": Learned()}, cross_model=True)
def xrd_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Cross relational distillation: the cross-modal teacher<->student relations must be symmetric. With

        M1 = κ·tI sTᵀ,  M2 = κ·tT sIᵀ,  M3 = κ·sI tTᵀ,  M4 = κ·sT tIᵀ

    ``XRD = ¼[KL(M1 ‖ M2) + KL(M2 ‖ M1) + KL(M4 ‖ M3) + KL(M3 ‖ M4)]``, each target detached. Swapping the
    modalities swaps M1<->M2 and M3<->M4, so XRD is symmetric under it; every term is zero when its two
    relation matrices are equal.
    """
    t_img, t_txt = out.teacher("xrd")
    s_img, s_txt = out.s_image_t.float(), out.s_text_t.float()
    k = out.scale("xrd", "kappa")
    m1, m2, m3, m4 = k * t_img @ s_txt.T, k * t_txt @ s_img.T, k * s_img @ t_txt.T, k * s_txt @ t_img.T
    return {"xrd": (kl_rows(m1, m2) + kl_rows(m2, m1) + kl_rows(m4, m3) + kl_rows(m3, m4)) / 4}
