"""The objective recipes: the *-scenes ones run end to end through the CLI (tiny steps, tiny teacher);
the real-scale ones load and validate."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.compress.recipe import load_recipe, packaged_recipes
from tinyclip_edge.compress.stages import get_method
from tinyclip_edge.losses.registry import parse_losses
from tinyclip_edge.models import load_model_dir, save_model_dir

TERMS = {
    "clip-kd-scenes": {"clip", "crd", "icl", "fd"},
    "clip-rd-scenes": {"clip", "crd", "icl", "fd", "vrd/kl", "vrd/ce_image", "vrd/ce_text", "xrd"},
    "dclip-scenes": {"hybrid/cosine", "hybrid/infonce"},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_scenes_recipe_runs_through_the_cli(tmp_path, tiny_package, name):
    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    n = len(load_recipe(name).stages)
    steps = [f"stages.{i}.{k}={v}" for i in range(n) for k, v in (("steps", 2), ("batch_size", 8), ("log_every", 1))]
    res = CliRunner().invoke(
        main, ["compress", name, f"teacher={teacher}", f"run_dir={tmp_path / 'run'}", "eval.data=scenes:val:16", *steps]
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    student = load_model_dir(run / "student")
    assert student.model.num_params()["total"] <= 0.26 * tiny_package.model.num_params()["total"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in metrics if r["stage"] == "student" for k in r}
    assert TERMS[name] <= logged, logged
    assert "student" in (run / "report.md").read_text()


@pytest.mark.parametrize("name", ["clip-kd", "clip-rd", "dclip", "clip-kd-scenes", "clip-rd-scenes", "dclip-scenes"])
def test_objective_recipes_are_packaged_and_valid(name):
    assert name in packaged_recipes()
    r = load_recipe(name)
    for st in r.stages:
        get_method(st.method).check(st)
        parse_losses(st.losses)
    assert load_recipe(r.to_dict()).to_dict() == r.to_dict()
