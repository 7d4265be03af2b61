"""Student shapes from parameter targets, importance ranking and manual weight inheritance."""

from __future__ import annotations

import pytest
import torch
from conftest import make_package, pruned_shape

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.shapes import check_fits, explicit_tower, shape_for_ratio
from tinyclip_edge.compress.stages.inherit.importance import activation_scores, magnitude_scores
from tinyclip_edge.compress.stages.inherit.plan import manual_inherit, select_layers
from tinyclip_edge.data import open_source
from tinyclip_edge.data.batches import TrainBatches
from tinyclip_edge.evaluation import evaluate
from tinyclip_edge.models import load_model_dir
from tinyclip_edge.models.presets import preset_shape


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("policy", ["balanced", "width"])
def test_shape_for_ratio_fits_the_budget(ratio, policy):
    teacher = preset_shape("scenes-teacher")
    student = shape_for_ratio(teacher, ratio, policy)
    tp, sp = teacher.params(), student.params()
    for tower in ("image", "text"):
        assert 0.9 * ratio * tp[tower] <= sp[tower] <= ratio * tp[tower]
    check_fits(teacher, student)
    if policy == "width":
        assert student.vision.layers == teacher.vision.layers


def test_per_tower_target_keeps_the_other_tower():
    teacher = preset_shape("scenes-teacher")
    student = shape_for_ratio(teacher, {"image": 0.5, "text": None})
    assert student.text == teacher.text and student.vision != teacher.vision


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, "half"])
def test_ratio_outside_zero_one_is_rejected(bad):
    with pytest.raises(UserError, match="between 0 and 1"):
        shape_for_ratio(preset_shape("scenes-teacher"), bad)


def test_student_larger_than_teacher_is_rejected():
    teacher = preset_shape("scenes-tiny")
    bigger = teacher.with_tower("image", explicit_tower(teacher, "image", {"layers": 3}))
    with pytest.raises(UserError, match="larger than its teacher"):
        check_fits(teacher, bigger)


def test_even_layer_selection_keeps_first_and_last():
    assert select_layers(12, 6, torch.zeros(12), "even") == [0, 2, 4, 7, 9, 11]
    assert select_layers(4, 2, torch.tensor([0.1, 0.9, 0.5, 0.2]), "importance") == [1, 2]


def test_inheriting_the_teachers_own_shape_is_exact():
    model = make_package(pruned_shape(), jitter=0.02).model
    student, _ = manual_inherit(model, model.shape, importance="magnitude")
    for (k, a), (_, b) in zip(model.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), k


def test_importance_keeps_the_units_that_matter():
    """Scale up one head and one neuron: both ranking methods must keep them."""
    pkg = make_package(jitter=0.02)
    model = pkg.model
    with torch.no_grad():
        blk = model.visual.blocks[0]
        d = model.shape.vision.head_dim
        blk.attn.out.weight[:, d : 2 * d] *= 20  # head 1 of layer 0
        blk.mlp.fc2.weight[:, 7] *= 50  # neuron 7 of layer 0
        blk.mlp.fc1.weight[7] *= 3
    src = open_source("scenes:calib", image_size=32)
    calib = [TrainBatches(src, pkg.preprocess, pkg.tokenizer(), 16)[0]]
    for scores in (magnitude_scores(model), activation_scores(model, calib)):
        assert int(scores["image"].heads[0].argmax()) == 1
        assert int(scores["image"].mlp[0].argmax()) == 7
        assert scores["text"].hidden.shape == (model.shape.text.width,)


def test_inherited_student_starts_far_above_chance(trained_teacher_dir):
    teacher = load_model_dir(trained_teacher_dir)
    target = shape_for_ratio(teacher.shape, 0.6)
    student, plan = manual_inherit(teacher.model, target)
    assert student.num_params()["total"] <= 0.62 * teacher.model.num_params()["total"]
    res = evaluate(teacher.with_model(student), "scenes:val:200")
    chance = 100 / 200
    r1 = (res["i2t"]["R@1"] + res["t2i"]["R@1"]) / 2
    assert r1 >= 5 * chance, res["i2t"]
    assert res["i2t"]["R@10"] >= 3 * 10 * chance
    # and a random network of the same shape is at chance level: the knowledge came from the teacher
    from tinyclip_edge.models import ClipModel

    torch.manual_seed(0)
    rand = evaluate(teacher.with_model(ClipModel(student.shape)), "scenes:val:200")
    assert (rand["i2t"]["R@1"] + rand["t2i"]["R@1"]) / 2 < r1 / 2
