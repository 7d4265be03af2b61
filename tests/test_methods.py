"""Stage methods as phases: the registry, the declared phases, and a method added in one place."""

from __future__ import annotations

import pytest

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import StageCfg, load_recipe
from tinyclip_edge.compress.stages import METHODS, get_method


def test_methods_declare_their_phases():
    st = StageCfg(name="s", steps=10)
    names = {m: [p.name for p in METHODS[m].phases(st)] for m in ("inherit", "prune", "scratch")}
    assert names == {
        "inherit": ["plan", "slice", "distil"],
        "prune": ["masks", "materialise", "distil"],
        "scratch": ["init", "distil"],
    }
    prune = METHODS["prune"].phases(st)
    assert [p.train(st).name for p in prune if p.train] == ["s.masks", "s"]  # checkpoint and metrics labels
    assert sum(p.train(st).steps for p in prune if p.train) == 10


def test_unknown_method_suggests_the_closest(tmp_path):
    with pytest.raises(UserError, match=r"stage stage-1: unknown method 'prnue' \(did you mean 'prune'\?\)"):
        get_method("prnue", "stage-1")
    with pytest.raises(
        UserError,
        match=r"'stages.0.method' must be one of inherit, prune, scratch, dclip-meta, "
        r"got 'inheirt' \(did you mean 'inherit'\?\)",
    ):
        load_recipe("quickstart", [f"run_dir={tmp_path / 'r'}", "stages.0.method=inheirt"])
    with pytest.raises(UserError, match="a dclip-meta stage .* set teacher: none"):
        load_recipe("dclip-scenes", ["stages.0.teacher=original"])
