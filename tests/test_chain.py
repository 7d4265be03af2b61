"""Progressive shape planning (compress/chain.py): every planned chain nests, manual and learned-mask."""

from __future__ import annotations

import pytest
import torch
from conftest import make_package
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.vocab import TOWERS
from tinyclip_edge.compress.chain import CHAIN_EVIDENCE, chain_note, nests, plan_chain
from tinyclip_edge.compress.recipe import StageCfg, load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.shapes import shape_for_ratio
from tinyclip_edge.compress.stages.prune.config import PruneCfg
from tinyclip_edge.compress.stages.prune.task import PruneTask
from tinyclip_edge.models import load_model_dir, save_model_dir
from tinyclip_edge.models.presets import preset_shape, vit_b_32_shape

TEACHERS = {
    "scenes": preset_shape("scenes-teacher"),
    # ViT-B/32-like proportions, so the planner also sees deep and wide towers
    "b32": vit_b_32_shape(),
}


def _stages(targets, methods=None):
    methods = methods or ["inherit"] * len(targets)
    return [StageCfg(name=f"s{i}", method=m, target=r) for i, (r, m) in enumerate(zip(targets, methods))]


def test_one_shot_shapes_do_not_always_nest_but_the_planned_chain_does():
    # positive control for `nests`: picking each stage's shape on its own breaks nesting here
    teacher = TEACHERS["scenes"]
    one_shot = [shape_for_ratio(teacher, r) for r in (0.5, 0.25)]
    assert not nests(one_shot[0], one_shot[1])
    planned = [p.shape for p in plan_chain(teacher, _stages([0.5, 0.25]))]
    assert nests(teacher, planned[0]) and nests(planned[0], planned[1])
    assert planned[-1] == one_shot[-1], "the final stage gets the shape a one-shot run would pick"


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(TEACHERS)), ratios=st.lists(st.floats(0.06, 0.9), min_size=2, max_size=4, unique=True)
)
def test_every_planned_manual_chain_nests_and_fits_its_budgets(name, ratios):
    teacher = TEACHERS[name]
    targets = sorted(ratios, reverse=True)
    if min(a - b for a, b in zip(targets, targets[1:])) < 0.01:
        return  # near-equal budgets may legitimately give the same shape; nesting still holds below
    try:
        plans = plan_chain(teacher, _stages(targets))
    except UserError as e:  # a target too small for any student is a clear error, never a crash
        assert "no " in str(e) and "fits" in str(e)
        return
    shapes = [teacher] + [p.shape for p in plans]
    full = teacher.params()
    for outer, inner in zip(shapes, shapes[1:]):
        assert nests(outer, inner)
    for shape, r in zip(shapes[1:], targets):
        for t in TOWERS:
            assert shape.params()[t] <= r * full[t] + 1


def test_targets_that_grow_are_refused():
    with pytest.raises(UserError, match="stage s1: target 0.5 .* not smaller than the previous stage's 0.25"):
        plan_chain(TEACHERS["scenes"], _stages([0.25, 0.5]))


def test_a_learned_mask_stage_keeps_what_the_next_stage_inherits():
    teacher = TEACHERS["scenes"]
    plans = plan_chain(teacher, _stages([0.5, 0.25], ["prune", "inherit"]))
    assert plans[0].shape is None and plans[1].shape is not None
    assert plans[0].floor == plans[1].shape
    # prune with gates that would rather drop whole heads and the residual stream: the floor wins
    from tinyclip_edge.models import ClipModel

    model = ClipModel(teacher)
    budget = {t: 0.5 * teacher.params()[t] for t in TOWERS}
    task = PruneTask(model, PruneCfg(floor=plans[0].floor.to_dict()), budget, mask_steps=10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in task.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3)
    pruned = task.plan().shape(teacher)
    assert nests(pruned, plans[1].shape)
    for t in TOWERS:
        assert pruned.params()[t] <= budget[t]
    # positive control: the same gates without the floor cut below what the next stage needs
    free = PruneTask(ClipModel(teacher), PruneCfg(), budget, mask_steps=10)
    free.load_state_dict(task.state_dict())
    assert not nests(free.plan().shape(teacher), plans[1].shape)


def test_a_floor_larger_than_the_budget_is_a_clear_error():
    teacher = TEACHERS["scenes"]
    from tinyclip_edge.models import ClipModel

    budget = {t: 0.3 * teacher.params()[t] for t in TOWERS}
    task = PruneTask(ClipModel(teacher), PruneCfg(floor=shape_for_ratio(teacher, 0.4).to_dict()), budget, 10)
    with pytest.raises(UserError, match="must keep the shape the next stage inherits"):
        task.plan()


def test_all_learned_mask_chains_get_no_floors():
    plans = plan_chain(TEACHERS["scenes"], _stages([0.5, 0.25], ["prune", "prune"]))
    assert all(p.shape is None and p.floor is None for p in plans)


def test_explicit_shapes_are_not_planned():
    stages = _stages([0.5, 0.25])
    stages[0].shape = "scenes-tiny"
    assert all(p.shape is None for p in plan_chain(TEACHERS["scenes"], stages))


def test_a_chain_gets_one_line_with_the_measured_comparison_and_the_one_shot_alternative():
    stages = _stages([0.5, 0.25, 0.1], ["inherit", "prune", "prune"])
    for stage, n in zip(stages, (100, 200, 300)):
        stage.steps = n
    note = chain_note(stages)
    assert "\n" not in note and CHAIN_EVIDENCE in note and "3-stage chain" in note
    assert "keep only stage s2 (target 0.1) and give it all 600 steps" in note
    # positive controls: one-shot, and a stage with an explicit shape (not planned), get no line
    assert chain_note(_stages([0.1])) is None
    explicit = _stages([0.5, 0.25])
    explicit[1].shape = "scenes-tiny"
    assert chain_note(explicit) is None


def test_runner_follows_the_plan(tmp_path, caplog):
    teacher_dir = save_model_dir(make_package(preset_shape("scenes-teacher")), tmp_path / "teacher")
    recipe = load_recipe(
        "quickstart",
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher={teacher_dir}",
            "baselines.scratch=false",
            "eval.data=null",
            "stages.0.steps=1",
            "stages.0.batch_size=8",
            "stages.1.steps=1",
            "stages.1.batch_size=8",
        ],
    )
    result = run_compress(recipe)
    s1, s2 = (load_model_dir(p).shape for p in result.stage_dirs)
    planned = [p.shape for p in plan_chain(load_model_dir(teacher_dir).shape, recipe.stages)]
    assert [s1, s2] == planned and nests(s1, s2)
    notes = [r.getMessage() for r in caplog.records if CHAIN_EVIDENCE in r.getMessage()]
    assert len(notes) == 1 and "2-stage chain" in notes[0]  # the quick start is a chain: it says so once
