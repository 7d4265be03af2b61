"""Manual weight inheritance (TinyCLIP): plan -> slice -> distil.

plan: the student shape from the stage's target, and which layers, heads, neurons and channels to keep
(importance-ranked, ``compress/stages/inherit/plan.py``); slice: cut the student out of the source; distil: train it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ....common.vocab import TOWERS
from ...shapes import check_fits
from ...slicing import KeepPlan, full_plan, slice_model
from ...tasks import DistillTask
from ..base import Carry, Phase, StageContext, StageMethod
from ..target import stage_shape
from .importance import compute_scores
from .plan import tower_plan

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ...recipe import StageCfg


def _plan(ctx: StageContext, carry: Carry) -> None:
    st, source = ctx.st, carry.model
    target = stage_shape(st, source.shape, ctx.original.shape)
    check_fits(source.shape, target)
    if target == source.shape:
        carry.notes["plan"] = full_plan(source.shape)
        return
    calib = ctx.calib() if st.importance == "activation" else None
    scores = compute_scores(source, st.importance, calib)
    carry.notes["plan"] = KeepPlan(
        *(tower_plan(source.shape.tower(t), target.tower(t), scores[t], st.layer_selection) for t in TOWERS)
    )


def _slice(ctx: StageContext, carry: Carry) -> None:
    carry.model = slice_model(carry.model, carry.notes["plan"])


class InheritMethod(StageMethod):
    name = "inherit"

    def phases(self, st: StageCfg) -> list[Phase]:
        return [
            Phase("plan", build=_plan),
            Phase("slice", build=_slice),
            Phase("distil", train=lambda s: s, task=lambda ctx, c: DistillTask(c.model)),
        ]

    def calib_batches(self, st: StageCfg) -> int:
        return st.calib_batches if st.importance == "activation" else 0
