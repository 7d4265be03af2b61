"""Contrastive CLIP loss, and TinyCLIP's affinity mimicking.

Affinity mimicking (TinyCLIP, Wu et al. 2023): for a batch, the image->text affinity of a model is the
row-wise softmax of ``scale * img @ txt.T`` and the text->image affinity the row-wise softmax of its
transpose. The student minimises the soft cross-entropy to the teacher's affinities, both directions,
averaged. Both distributions use one fixed scale (TinyCLIP fixes it at about 50) unless
``scale: null``, which uses each model's own logit scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import DistillOutputs, register_loss


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@register_loss("clip", options=("scale",))
def clip_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Symmetric InfoNCE on ground-truth pairs, with the student's learnable scale (or a fixed one)."""
    scale = out.student_logit_scale if cfg.get("scale") is None else float(cfg["scale"])
    logits = scale * out.student_image @ out.student_text.T
    labels = torch.arange(len(logits), device=logits.device)
    return {"clip": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2}


@register_loss("affinity", options=("scale",))
def affinity_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    out.require_teacher("affinity")
    fixed = cfg.get("scale", 50.0)
    s_scale = out.student_logit_scale if fixed is None else float(fixed)
    t_scale = out.teacher_logit_scale if fixed is None else float(fixed)
    s_logits = s_scale * out.student_image @ out.student_text.T
    with torch.no_grad():
        t_logits = t_scale * out.teacher_image.float() @ out.teacher_text.float().T
    i2t = soft_cross_entropy(s_logits, F.softmax(t_logits, dim=-1))
    t2i = soft_cross_entropy(s_logits.T, F.softmax(t_logits.T, dim=-1))
    return {"affinity": (i2t + t2i) / 2}
