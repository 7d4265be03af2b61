"""Progressive compression plans its whole chain of stage shapes up front.

Letting every stage pick the best shape for its own budget does not nest: the 50% shape may keep all
layers and cut MLP width, the 25% shape cut layers and keep more MLP width than the 50% student has, so
the next stage has to cut the previous student along every dimension, including ones it had just
learned to use. The planner works backwards from the goal instead:

1. the final shape is the one a one-shot run would pick for the last stage's target
   (``shapes.shape_for_tower`` with that stage's policy);
2. every earlier stage, first to last, gets the shape that best uses its own budget (the same search and
   balance as a one-shot run) among the uniform shapes that lie between the previous stage's shape and
   the final one: no more layers, heads (the residual width follows them, as in every manual student)
   or MLP neurons than the previous stage, no fewer than the final stage.

So stage k's shape contains stage k+1's: each stage only removes what the later stages also remove. A learned-mask (``prune``) stage decides its
own shape, so it gets a *floor* instead: the shape of the next planned stage, which the materialised
student must contain (every layer keeps at least its heads and MLP neurons, the residual stream at least
its width), so the masks may remove only what the following budgets allow.

Planning applies to chains of ``inherit`` and ``prune`` stages given by ``target``; a stage with an
explicit ``shape`` (or a ``scratch`` stage) is taken as given, and target stages after it are sized the
old way, relative to their source (``stages.target.stage_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..common.errors import UserError
from ..common.vocab import TOWERS
from ..models.shape import ClipShape
from .shapes import shape_for_tower, tower_targets

PLANNED_METHODS = ("inherit", "prune")


@dataclass
class StagePlan:
    shape: ClipShape | None = None  # the planned student shape (manual stages)
    floor: ClipShape | None = None  # the smallest shape a learned-mask stage must keep


def _planned(st: Any) -> bool:
    return st.method in PLANNED_METHODS and st.shape is None and _target(st) is not None


def _target(st: Any) -> Any:
    if st.method == "prune" and st.prune.target is not None:
        return st.prune.target
    return st.target


def _leading_chain(stages: list[Any]) -> list[int]:
    """The chain: the indices of the leading run of planned stages (a later explicit or scratch stage ends it)."""
    chain: list[int] = []
    for i, st in enumerate(stages):
        if not _planned(st):
            break
        chain.append(i)
    return chain


def plan_chain(teacher: ClipShape, stages: list[Any]) -> list[StagePlan]:
    """One StagePlan per stage (empty where the stage is not planned). `stages` are StageCfg objects."""
    plans = [StagePlan() for _ in stages]
    chain = _leading_chain(stages)
    manual = [i for i in chain if stages[i].method == "inherit"]
    if not manual:
        return plans  # nothing to size: learned masks decide every shape
    targets = {i: tower_targets(_target(stages[i])) for i in chain}
    for tower in TOWERS:
        ratios = [(i, targets[i][tower]) for i in chain if targets[i][tower] is not None]
        for (_, a), (j, b) in zip(ratios, ratios[1:]):
            if b >= a:
                raise UserError(
                    f"stage {stages[j].name}: target {b} of the teacher's {tower} parameters is not "
                    f"smaller than the previous stage's {a}; stage targets must shrink"
                )
    shapes: dict[int, ClipShape] = {i: teacher for i in manual}
    for tower in TOWERS:
        sized = [i for i in manual if targets[i][tower] is not None]
        last = sized[-1] if sized else None
        final = (
            shape_for_tower(teacher, tower, targets[last][tower], stages[last].shape_policy)
            if last is not None
            else None
        )
        prev = teacher.tower(tower)
        for i in manual:
            if targets[i][tower] is None:  # no target for this tower: keep it as the previous stage left it
                ts = prev
            elif i == last:
                ts = final
            else:
                ts = shape_for_tower(teacher, tower, targets[i][tower], stages[i].shape_policy, within=(prev, final))
            shapes[i] = shapes[i].with_tower(tower, ts)
            prev = ts
    for i in manual:
        plans[i].shape = shapes[i].validate()
    for k, i in enumerate(chain):
        if stages[i].method == "prune":
            later = [j for j in chain[k + 1 :] if stages[j].method == "inherit"]
            if later:
                plans[i].floor = plans[later[0]].shape
    return plans


# benchmarks/results/multistage-budget.md (issue 21): one-shot vs the planned 50% -> 25% -> 10% chain at equal
# total steps on the scenes teacher, 2 seeds, 150 / 450 / 1,350 steps. One-shot won at every budget, for manual
# and learned masks and with TinyCLIP's own mask rules; the gap narrowed as the budget grew.
CHAIN_EVIDENCE = (
    "at equal total steps one-shot beat a 3-stage chain at every budget measured (scenes, 150 to 1,350 steps; "
    "at 1,350 R@1 51.8 vs 45.4 manual, 52.0 vs 48.8 learned masks: benchmarks/results/multistage-budget.md)"
)


def chain_note(stages: list[Any]) -> str | None:
    """One line for a recipe that compresses through a chain (two or more planned stages, each cutting the
    previous student): what we measured against chains, and the one-shot recipe to run instead."""
    chain = [stages[i] for i in _leading_chain(stages)]
    if len(chain) < 2:
        return None
    steps = sum(st.steps for st in chain)
    last = chain[-1]
    return (
        f"this recipe compresses in a {len(chain)}-stage chain; {CHAIN_EVIDENCE}. For one-shot, keep only "
        f"stage {last.name} (target {_target(last)}) and give it all {steps:,} steps"
    )


def nests(outer: ClipShape, inner: ClipShape) -> bool:
    """Whether `inner` can be cut out of `outer` without needing anything `outer` removed: no more layers,
    no wider residual stream, and every inner layer no wider than the narrowest outer layer."""
    for t in TOWERS:
        o, i = outer.tower(t), inner.tower(t)
        if i.layers > o.layers or i.width > o.width or i.head_dim != o.head_dim:
            return False
        if max(i.heads, default=0) > min(o.heads, default=0) or max(i.mlp, default=0) > min(o.mlp, default=0):
            return False
    return True
