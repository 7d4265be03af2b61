"""The prune stage's own recipe section (``stages.N.prune``): learnable structured masks and their rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ....common.errors import UserError
from ....common.typed import Range
from ....common.typed import join_key as _at
from ...shapes import RATIO, TowerRatios, check_shape


@dataclass
class PruneCfg:
    """Automatic inheritance: learnable hard-concrete masks (method: prune)."""

    target: RATIO | TowerRatios | None = None  # fraction of parameters to keep, in (0, 1); default: the stage's
    mask_lr: Annotated[float, Range(0, None, lo_open=True)] = 0.05  # mask (log-alpha) learning rate, > 0
    lambda_lr: Annotated[float, Range(0, None, lo_open=True)] = 0.1  # Lagrange multipliers' learning rate, > 0
    warmup: Annotated[float, Range(0, 1)] = (
        0.5  # fraction of mask-learning steps over which the target ramps in, in [0, 1]
    )
    mask_steps: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = (
        0.7  # fraction of the stage spent learning masks, in (0, 1)
    )
    layers: bool = False  # also gate whole attention / MLP sub-layers
    hidden: bool = True  # prune residual (hidden) channels
    joint: bool = False  # one sparsity target for both towers instead of one per tower
    floor: dict | None = None  # a shape the materialised student must contain; the runner sets it
    # from the next planned stage (compress/chain.py); rarely set by hand
    # open_clip compatibility: keep a residual width that is a multiple of the head size and holds every
    # layer's heads (open_clip needs heads x head_dim = width); the budget is met around it
    round_hidden_to_head: bool = False
    # TinyCLIP's released rules (docs/PRUNING.md); the first choice of each is the default (CoFi's paper form).
    # lagrangian: two-sided lambda1*(s-t) + lambda2*(s-t)^2, lambdas from 0 | one-sided lambda1*max(t-s,0) +
    # lambda2*max(t-s,0)^2, lambdas from 10
    lagrangian: Literal["two-sided", "one-sided"] = "two-sided"
    # log_alpha: free (starts at 2, unbounded) | clamped (starts at 10, clamped to +-4.6 after every step)
    log_alpha: Literal["free", "clamped"] = "free"
    # eval_gates: the kept units' gate values in the student. louizos: clamp(sigmoid(la)*1.2-0.1, 0, 1) |
    # cofi: sigmoid(0.8*la/beta), the round(expected closed) lowest of each group set to 0
    eval_gates: Literal["louizos", "cofi"] = "louizos"
    # sparsity: what s counts. tower: every parameter of the towers | blocks: the blocks' weights only
    sparsity: Literal["tower", "blocks"] = "tower"

    def validate_fields(self, path: str) -> None:
        if self.floor is not None:
            if "embed_dim" not in self.floor:
                raise UserError(f"{_at(path, 'floor')} must be a full model shape (with embed_dim, vision and text)")
            check_shape(self.floor, _at(path, "floor"))
