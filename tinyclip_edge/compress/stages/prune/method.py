"""Automatic weight inheritance (TinyCLIP with CoFi-style masks): masks -> materialise -> distil.

masks: hard-concrete gates learn what to keep under a Lagrangian budget for ``prune.mask_steps`` of the
stage's steps (``compress/stages/prune/task.py``), checkpointed as ``<name>.masks``; materialise: the gates become
deterministic and the kept units are cut out exactly at the budget, saved as the model directory
``<name>.masks``; distil: the materialised student keeps distilling for the rest of the steps.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ....common.errors import UserError
from ...shapes import tower_targets
from ...tasks import DistillTask, StageTask
from ..base import Carry, Phase, StageContext, StageMethod
from .task import PruneTask

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ...recipe import StageCfg


def mask_steps(st: StageCfg) -> int:
    return max(1, round(st.steps * st.prune.mask_steps))


def _masks_cfg(st: StageCfg) -> StageCfg:
    return replace(st, name=f"{st.name}.masks", steps=mask_steps(st))


def _distil_cfg(st: StageCfg) -> StageCfg:
    return replace(st, steps=max(1, st.steps - mask_steps(st)))


def _prune_task(ctx: StageContext, carry: Carry) -> StageTask:
    st = ctx.st
    spec = st.prune.target if st.prune.target is not None else st.target
    if spec is None:
        raise UserError(f"stage {st.name}: a prune stage needs a target (stages.N.target or prune.target)")
    src_p, t_p = carry.model.shape.params(), ctx.original.shape.params()
    budget = {}
    for tower, r in tower_targets(spec).items():
        if r is None:
            continue
        budget[tower] = r * t_p[tower]
        if budget[tower] >= src_p[tower]:
            raise UserError(
                f"stage {st.name}: target {r} of the teacher's {tower} parameters is not smaller than "
                f"the model it prunes ({src_p[tower] / t_p[tower]:.2f}); stage targets must shrink"
            )
    # A copy of the model: the source may be the teacher itself, which must stay frozen and untouched.
    task = PruneTask(copy.deepcopy(carry.model), st.prune, budget, mask_steps(st), ctx.seed)
    task.plan()  # fail now, not after training, if the budget cannot be met at all
    return task


def _materialise(ctx: StageContext, carry: Carry) -> None:
    assert carry.task is not None
    carry.model = carry.task.finalize().cpu().eval()
    carry.task = None


class PruneMethod(StageMethod):
    name = "prune"

    def phases(self, st: StageCfg) -> list[Phase]:
        return [
            Phase("masks", train=_masks_cfg, task=_prune_task, finalize=False),
            Phase("materialise", build=_materialise, output=lambda s: f"{s.name}.masks"),
            Phase("distil", train=_distil_cfg, task=lambda ctx, c: DistillTask(copy.deepcopy(c.model))),
        ]

    def provenance(self, st: StageCfg) -> dict[str, Any]:
        return {"mask_steps": mask_steps(st)}
