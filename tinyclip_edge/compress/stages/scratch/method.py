"""Training from random initialisation: init -> distil. Trains built-in teachers and the same-shape
baselines of the quick start."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ....models import ClipModel
from ...tasks import DistillTask
from ..base import Carry, Phase, StageContext, StageMethod
from ..target import stage_shape

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ...recipe import StageCfg


def _init(ctx: StageContext, carry: Carry) -> None:
    target = stage_shape(ctx.st, carry.model.shape, ctx.original.shape)
    torch.manual_seed(ctx.seed)  # the initial weights are a function of the stage's seed
    carry.model = ClipModel(target)


class ScratchMethod(StageMethod):
    name = "scratch"

    def phases(self, st: StageCfg) -> list[Phase]:
        return [
            Phase("init", build=_init),
            Phase("distil", train=lambda s: s, task=lambda ctx, c: DistillTask(c.model)),
        ]
