"""Recipes (YAML -> dataclasses, overrides, errors) and the loss registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import apply_override, dump_recipe, load_recipe, packaged_recipes
from tinyclip_edge.losses import DistillOutputs, get_loss
from tinyclip_edge.losses.registry import combine, parse_losses


@pytest.mark.parametrize(
    "name",
    [
        "quickstart",
        "quickstart-auto",
        "scenes-teacher",
        "vit-b-32-to-50pct",
        "vit-b-16-to-8m",
        "vit-b-32-auto-50pct",
        "vit-b-16-progressive",
    ],
)
def test_packaged_recipes_load(name):
    assert name in packaged_recipes()
    r = load_recipe(name)
    assert r.stages and all(s.name for s in r.stages)
    assert load_recipe(r.to_dict()).to_dict() == r.to_dict()  # the saved form loads back unchanged


def test_overrides_are_parsed_as_yaml():
    r = load_recipe(
        "quickstart",
        ["stages.0.steps=7", "data.train=pairs.csv", "stages.1.target={image: 0.2}", "baselines.scratch=false"],
    )
    assert r.stages[0].steps == 7 and r.data.train == "pairs.csv"
    assert r.stages[1].target == {"image": 0.2} and r.baselines.scratch is False


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown recipe key 'stages.0.stpes' \(did you mean 'steps'\?\)"):
        load_recipe("quickstart", ["stages.0.stpes=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match="'stages.0.lr' must be a number"):
        load_recipe("quickstart", ["stages.0.lr=fast"])


def test_override_of_a_missing_stage():
    with pytest.raises(UserError, match="no index 5"):
        apply_override({"stages": [{}]}, "stages.5.steps=3")


def test_recipe_file_and_name_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'quickstart'"):
        load_recipe("quikstart")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))


def test_dumped_recipe_is_safe_yaml():
    import yaml

    text = dump_recipe(load_recipe("quickstart"))
    assert yaml.safe_load(text)["name"] == "quickstart"


def _outputs(seed: int = 0, same: bool = False):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(8, 16, generator=g), dim=-1)
    if same:
        return DistillOutputs(
            img.clone().requires_grad_(), txt.clone().requires_grad_(), torch.tensor(50.0), img, txt, torch.tensor(50.0)
        )
    t_img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    t_txt = F.normalize(t_img + 0.3 * torch.randn(8, 16, generator=g), dim=-1)
    return DistillOutputs(
        img.requires_grad_(), txt.requires_grad_(), torch.tensor(50.0), t_img, t_txt, torch.tensor(50.0)
    )


def test_affinity_is_minimal_when_student_equals_teacher():
    out = _outputs(same=True)
    loss = get_loss("affinity")(out, {})["affinity"]
    loss.backward()
    assert out.student_image.grad.abs().max() < 1e-5  # at its minimum: the teacher's own entropy
    assert get_loss("affinity")(_outputs(), {})["affinity"] > loss


def test_clip_loss_prefers_matched_pairs():
    out = _outputs()
    good = get_loss("clip")(out, {})["clip"]
    shuffled = DistillOutputs(out.student_image, out.student_text.roll(1, 0), out.student_logit_scale)
    assert good < get_loss("clip")(shuffled, {})["clip"]


def test_loss_specs_and_weights():
    specs = parse_losses({"affinity": 2.0, "clip": {"weight": 0.5, "scale": 20}})
    total, logs = combine(specs, _outputs())
    assert abs(float(total.detach()) - (2 * logs["affinity"] + 0.5 * logs["clip"])) < 1e-4
    with pytest.raises(UserError, match="unknown loss 'afinity'.*did you mean 'affinity'"):
        parse_losses({"afinity": 1})
    with pytest.raises(UserError, match="has no option 'scael'"):
        parse_losses({"clip": {"scael": 3}})


def test_affinity_without_teacher_is_a_clear_error():
    out = _outputs()
    out.teacher_image = None
    with pytest.raises(UserError, match="needs a teacher"):
        get_loss("affinity")(out, {})


def test_exponent_floats_without_a_dot():
    assert load_recipe("quickstart", ["stages.0.lr=1e-4"]).stages[0].lr == pytest.approx(1e-4)


def test_a_stage_without_a_teacher_takes_only_the_losses_that_declare_they_need_none(monkeypatch):
    from tinyclip_edge.losses.registry import REGISTRY, register_loss, teacher_free_losses

    base = ["stages.0.teacher=none", "stages.1.teacher=none"]
    assert load_recipe("quickstart", [*base, "stages.0.losses={clip: 1.0}", "stages.1.losses={clip: 1.0}"])
    with pytest.raises(UserError, match=r"stages\.0: teacher: none allows only the clip loss, not affinity"):
        load_recipe("quickstart", base)  # the quick start distils with affinity, which reads the teacher
    # the rule is what each registration declares: a new teacher-free loss is accepted where clip is
    monkeypatch.setattr("tinyclip_edge.losses.registry.REGISTRY", dict(REGISTRY))
    register_loss("uniformity", needs_teacher=False)(lambda out, cfg: {})
    assert teacher_free_losses() == ("clip", "uniformity")
    losses = ["stages.0.losses={uniformity: 1.0}", "stages.1.losses={clip: 1.0}"]
    assert load_recipe("quickstart", [*base, *losses]).stages[0].losses == {"uniformity": 1.0}
