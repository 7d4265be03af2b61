"""DCLIP's meta teacher as a stage: head (fine-tune one cross-attention block on the frozen teacher).

The stage starts from the model it is given (the original teacher when it comes first) and trains only the
block (``compress/stages/dclip/meta_teacher.py``), with the stage's losses (the dclip recipes: ``clip: {scale: 20}``, InfoNCE at
temperature 0.05). Its output directory is the teacher's model directory plus the head; the next stage
starts again from the teacher (not from the meta teacher), and a next stage with ``teacher: previous``
learns from the meta teacher's enriched embeddings (with the ``hybrid`` loss in the dclip recipes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ....common.errors import UserError
from ....models import ClipPackage
from ...tasks import StageTask
from ..base import Carry, Phase, StageContext, StageMethod
from .config import DclipCfg
from .meta_teacher import HeadCfg, MetaTask, load_meta_teacher, new_meta_teacher, save_meta_teacher

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ...recipe import StageCfg


def _head_cfg(ctx: StageContext, dim: int) -> HeadCfg:
    d = ctx.recipe.dclip if ctx.recipe is not None and ctx.recipe.dclip is not None else DclipCfg()
    return HeadCfg(
        dim=dim, heads=d.heads, max_regions=d.max_regions, max_spans=d.max_spans, pool_temperature=d.pool_temperature
    )


def _meta_task(ctx: StageContext, carry: Carry) -> StageTask:
    src = ctx.source.with_model(carry.model)
    return MetaTask(new_meta_teacher(src, _head_cfg(ctx, carry.model.shape.embed_dim), ctx.seed))


class DclipMetaMethod(StageMethod):
    name = "dclip-meta"
    compresses = False

    def phases(self, st: StageCfg) -> list[Phase]:
        return [Phase("head", train=lambda s: s, task=_meta_task)]

    def check(self, st: StageCfg) -> None:
        if st.teacher != "none":
            raise UserError(
                f"stage {st.name}: a dclip-meta stage trains its head on the frozen model it starts "
                "from and needs no distillation teacher; set teacher: none"
            )

    def save(self, pkg: ClipPackage, path: Path) -> None:
        save_meta_teacher(pkg, path)

    def hand_over(self, source: ClipPackage, output: ClipPackage) -> tuple[ClipPackage, ClipPackage]:
        assert output.path is not None
        return source, load_meta_teacher(output.path)
