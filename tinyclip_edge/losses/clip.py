"""Contrastive CLIP loss, and TinyCLIP's affinity mimicking.

Affinity mimicking (TinyCLIP, Wu et al. 2023): for a batch, the image->text affinity of a model is the
row-wise softmax of ``scale * img @ txt.T`` and the text->image affinity the row-wise softmax of its
transpose. The student minimises the soft cross-entropy to the teacher's affinities, both directions,
averaged. Which logit scale multiplies each model's similarities is an option:

    scale: own     (default, as TinyCLIP's code does) the teacher's logit scale for the teacher's affinities,
                   the student's own learnable one for the student's: the student learns its temperature
                   from the teacher's distributions;
    scale: fixed   both models use ``fixed_scale`` (default 50), a constant temperature.

    loss = 1/2 [ CE(softmax(t_T * tI tT^T), s_S * sI sT^T) + CE(softmax(t_T * tT tI^T), s_S * sT sI^T) ]

with CE the row-wise soft cross-entropy averaged over rows and t_T, s_S the scales chosen above.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.errors import UserError
from .registry import DistillOutputs, register_loss


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@register_loss("clip", options=("scale",), needs_teacher=False)
def clip_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Symmetric InfoNCE on ground-truth pairs, with the student's learnable scale (or a fixed one)."""
    scale = out.student_logit_scale if cfg.get("scale") is None else float(cfg["scale"])
    logits = scale * out.student_image @ out.student_text.T
    labels = torch.arange(len(logits), device=logits.device)
    return {"clip": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2}


AFFINITY_SCALES = ("own", "fixed")


def check_affinity(cfg: dict[str, Any]) -> None:
    """Recipe-time check of the affinity options (a bad value fails before any training)."""
    mode = cfg.get("scale", "own")
    if mode not in AFFINITY_SCALES:
        raise UserError(
            f"losses.affinity.scale must be own (each model's logit scale) or fixed (fixed_scale for "
            f"both), not {mode!r}; e.g. {{affinity: {{weight: 1, scale: fixed, fixed_scale: 50}}}}"
        )
    fixed = cfg.get("fixed_scale", 50.0)
    if isinstance(fixed, bool) or not isinstance(fixed, (int, float)) or not 0 < fixed < float("inf"):
        raise UserError(f"losses.affinity.fixed_scale must be a positive number, not {fixed!r}")
    if "fixed_scale" in cfg and mode != "fixed":
        raise UserError("losses.affinity.fixed_scale is only used with scale: fixed; add scale: fixed or drop it")


@register_loss("affinity", options=("scale", "fixed_scale"), check=check_affinity)
def affinity_loss(out: DistillOutputs, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """TinyCLIP's affinity mimicking (see the module docstring for the formula and the scale options)."""
    out.require_teacher("affinity")
    check_affinity(cfg)
    if cfg.get("scale", "own") == "own":
        s_scale, t_scale = out.student_logit_scale, out.teacher_logit_scale
    else:
        s_scale = t_scale = float(cfg.get("fixed_scale", 50.0))
    s_logits = s_scale * out.student_image @ out.student_text.T
    with torch.no_grad():
        t_logits = t_scale * out.teacher_image.float() @ out.teacher_text.float().T
    i2t = soft_cross_entropy(s_logits, F.softmax(t_logits, dim=-1))
    t2i = soft_cross_entropy(s_logits.T, F.softmax(t_logits.T, dim=-1))
    return {"affinity": (i2t + t2i) / 2}
