"""The student shape a stage asks for: explicit (a preset, per-tower sizes, a full shape) or a target
fraction of the ORIGINAL teacher's parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...common.errors import UserError
from ...models import ClipShape
from ..chain import nests
from ..shapes import explicit_shape, shape_for_ratio, tower_targets

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ..recipe import StageCfg


def stage_shape(st: StageCfg, source: ClipShape, teacher: ClipShape) -> ClipShape:
    """The student shape of a stage: explicit (preset name, per-tower dict, or a full shape), or the
    stage's target (a fraction of the ORIGINAL teacher's parameters) applied to the source model."""
    if st.shape is not None:
        shape = explicit_shape(st.shape, source, f"stage {st.name}: shape")
        assert shape is not None  # with a source, explicit_shape always builds one
        return shape
    if st.target is None:
        raise UserError(f"stage {st.name}: give a target (fraction of the teacher's parameters) or a shape")
    targets = tower_targets(st.target)
    if source != teacher:  # a later stage: the shape a one-shot run would pick, if the source can hold it
        direct = shape_for_ratio(teacher, targets, st.shape_policy)
        if _holds(source, direct):
            return direct
    src_p, t_p = source.params(), teacher.params()
    relative: dict[str, float | None] = {}
    for tower, r in targets.items():
        if r is None:
            relative[tower] = None
            continue
        rel = r * t_p[tower] / src_p[tower]
        if rel >= 1.0:
            if abs(src_p[tower] - r * t_p[tower]) / t_p[tower] < 0.01:
                relative[tower] = None  # already at the target
                continue
            raise UserError(
                f"stage {st.name}: target {r} of the teacher's {tower} parameters is not smaller than "
                f"the previous stage's {src_p[tower] / t_p[tower]:.2f}; stage targets must shrink"
            )
        relative[tower] = rel
    return shape_for_ratio(source, relative, st.shape_policy)


def _holds(source: ClipShape, target: ClipShape) -> bool:
    """Whether every layer of `target` fits inside the layers it would inherit from `source`."""
    return nests(source, target)
