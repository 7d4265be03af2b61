"""The building blocks of the relational objectives (notation of docs/ARCHITECTURE.md, "Losses"):

CE(M)      cross-entropy of the rows of logits M against the diagonal (pair i matches pair i), mean over rows
KL(x ‖ y)  row-wise KL(softmax(y) ‖ softmax(x)), averaged over rows ("batchmean"), temperature 1;
           y is the target and is detached (no gradient flows into it)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ce_diag(logits: Tensor) -> Tensor:
    """CE(M): row i's target class is i."""
    logits = logits.float()
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def kl_rows(x: Tensor, y: Tensor) -> Tensor:
    """KL(x ‖ y) = 1/B Σ_i Σ_j p_ij (log p_ij − log q_ij), p = softmax(y.detach()), q = softmax(x), row-wise."""
    log_q = F.log_softmax(x.float(), dim=-1)
    log_p = F.log_softmax(y.detach().float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def symmetric_infonce(img: Tensor, txt: Tensor, scale: Tensor | float) -> Tensor:
    """½[CE(s·I Tᵀ) + CE(s·T Iᵀ)]: CLIP's contrastive task loss."""
    logits = scale * img.float() @ txt.float().T
    return (ce_diag(logits) + ce_diag(logits.T)) / 2
