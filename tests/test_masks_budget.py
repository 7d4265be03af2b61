"""Learned masks meet the budget whatever the gates did in training (issue 21, item 0), and a residual width
open_clip can hold on request (issue 17, item 4: prune.round_hidden_to_head)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from conftest import make_package

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.vocab import TOWERS
from tinyclip_edge.compress.recipe import load_recipe, packaged_recipes
from tinyclip_edge.compress.slicing import TowerPlan
from tinyclip_edge.compress.stages.prune.config import PruneCfg
from tinyclip_edge.compress.stages.prune.task import PruneTask
from tinyclip_edge.models import ClipModel, save_model_dir
from tinyclip_edge.models.presets import preset_shape, vit_b_32_shape
from tinyclip_edge.models.shape import ClipShape

OPEN_HIDDEN = 67  # quickstart-auto's stage-1 student had 67 residual channels (issue 17)


def overshoot(task: PruneTask, seed: int = 0, hidden: int = OPEN_HIDDEN, heads: float = 0.5, mlp: float = 0.3):
    """Gates as mask learning left them when expected sparsity overshot the target: a few units clearly open
    (log-alpha ~ +3), the rest clearly closed (~ -5, deterministic gate 0)."""
    g = torch.Generator().manual_seed(seed)

    def fill(la: torch.Tensor, n_open: int) -> None:
        order = torch.randperm(len(la), generator=g)
        vals = torch.full((len(la),), -5.0)
        vals[order[:n_open]] = 3.0
        la.copy_(vals + 0.3 * torch.randn(len(la), generator=g))

    with torch.no_grad():
        for gates in task.gates.values():
            if gates.hidden is not None:
                fill(gates.hidden.log_alpha, min(hidden, len(gates.hidden.log_alpha)))
            for hc in gates.heads:
                fill(hc.log_alpha, max(1, round(heads * len(hc.log_alpha))))
            for hc in gates.mlp:
                fill(hc.log_alpha, max(1, round(mlp * len(hc.log_alpha))))
            for hc in (*(gates.attn_layer or ()), *(gates.mlp_layer or ())):
                hc.log_alpha.fill_(3.0)


def _count(shape: ClipShape, tower: str, plan: TowerPlan) -> int:
    return shape.with_tower(tower, plan.shape(shape.tower(tower))).params()[tower]


def _open_only(task: PruneTask, tower: str) -> int:
    """Parameters of the plan that keeps only units whose deterministic gate is open, and every sub-layer:
    what a materialisation that drops closed units can reach at most."""
    g, shape = task.gates[tower], task.model.shape

    def opened(hc):
        return [int(i) for i in (hc.deterministic() > 0).nonzero().flatten()]

    s = shape.tower(tower)
    plan = TowerPlan(
        list(range(s.layers)),
        opened(g.hidden) if g.hidden is not None else list(range(s.width)),
        [opened(h) or [0] for h in g.heads],
        [opened(m) or [0] for m in g.mlp],
    )
    return _count(shape, tower, plan)


@pytest.mark.parametrize("joint", [False, True])
def test_overshooting_gates_still_materialise_on_the_budget(joint):
    torch.manual_seed(0)
    model = ClipModel(preset_shape("scenes-teacher")).eval()
    full = model.shape.params()
    budget = {t: 0.5 * full[t] for t in TOWERS}
    task = PruneTask(model, PruneCfg(joint=joint), budget, mask_steps=10)
    overshoot(task)
    # positive control: the open units hold far less than the budget, so keeping only them (today's main: closed
    # residual channels were dropped after the budget was filled) misses it by more than 2%
    for t in TOWERS:
        assert _open_only(task, t) < 0.9 * budget[t]
    plan = task.plan()
    small = task.finalize()
    got = small.num_params()
    for group in [list(TOWERS)] if joint else [[t] for t in TOWERS]:
        used, target = sum(got[t] for t in group), sum(budget[t] for t in group)
        assert 0.98 * target <= used <= target, (group, used / target)
    # the closed units fill the budget as zero weights: the student is still exactly the masked network
    masks = task.deterministic_masks(plan)
    torch.manual_seed(1)
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(3, 33, (3, 24))
    ids[:, 9] = 34
    with torch.no_grad():
        assert (model.encode_image(images, masks=masks["image"]) - small.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(ids, masks=masks["text"]) - small.encode_text(ids)).abs().max() <= 1e-5


def _teacher_shape(spec: str) -> ClipShape:
    if spec.startswith("builtin:"):
        return preset_shape(spec.split(":", 1)[1])
    b32 = vit_b_32_shape()
    if spec.startswith("ViT-B-32"):
        return b32
    assert spec.startswith("ViT-B-16"), f"a packaged prune recipe with a teacher this test does not know: {spec}"
    return dataclasses.replace(b32, vision=dataclasses.replace(b32.vision, patch_size=16))


def _prune_recipes() -> list[str]:
    return [n for n in packaged_recipes() if any(s.method == "prune" for s in load_recipe(n).stages)]


def test_every_packaged_prune_recipe_is_covered():
    assert {"quickstart-auto", "vit-b-32-auto-50pct", "vit-b-16-progressive"} <= set(_prune_recipes())


# Stages whose budget no residual width that is a multiple of the head size can use: ViT-B/16's text tower at
# 10% (6.3M parameters) holds well under 98% of it at width 64 with every head and neuron of the stage-2
# student (59-78% here), and its token embeddings alone are 6.3M at width 128. round_hidden_to_head refuses
# these with one line, when the stage starts (before any training: the prune stage plans once up front).
ROUNDING_IMPOSSIBLE = {("vit-b-16-progressive", "stage-3")}


@pytest.mark.parametrize("round_hidden", [False, True])
@pytest.mark.parametrize("gates", ["overshoot", "initial", "random"])
@pytest.mark.parametrize("name", _prune_recipes())
def test_packaged_prune_recipes_materialise_within_2_percent(name, gates, round_hidden):
    """Every stage of every packaged prune recipe, on its teacher's shape (no weights: a meta-device model),
    with gates that overshot, gates as initialised, and random gates; with round_hidden_to_head, also a
    residual width open_clip can hold."""
    recipe = load_recipe(name)
    teacher = _teacher_shape(recipe.teacher)
    t_params = teacher.params()
    shape = teacher
    for i, st in enumerate(recipe.stages):
        assert st.method == "prune"
        cfg = dataclasses.replace(st.prune, round_hidden_to_head=round_hidden)
        target = cfg.target if cfg.target is not None else st.target
        budget = {t: target * t_params[t] for t in TOWERS}
        with torch.device("meta"):
            model = ClipModel(shape)
        task = PruneTask(model, cfg, budget, mask_steps=10, seed=i)
        if gates == "overshoot":
            overshoot(task, seed=i, hidden=int(0.52 * shape.vision.width))
        elif gates == "random":
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in task.gates.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 3)
        if round_hidden and (name, st.name) in ROUNDING_IMPOSSIBLE:
            with pytest.raises(
                UserError, match="round_hidden_to_head: no residual width that is a multiple of the head size"
            ):
                task.plan()
            return
        plan = task.plan()
        for t in TOWERS:
            s = plan.tower(t).shape(shape.tower(t))
            used = _count(shape, t, plan.tower(t))
            assert 0.98 * budget[t] <= used <= budget[t], (name, st.name, t, used / budget[t])
            if round_hidden:
                assert s.width % s.head_dim == 0 and max(s.heads) <= s.width // s.head_dim, (st.name, t, s)
        nxt = shape
        for t in TOWERS:  # the next stage prunes this stage's student
            nxt = nxt.with_tower(t, plan.tower(t).shape(shape.tower(t)))
        shape = nxt


# ------------------------------------------------------------------------------ open_clip (issue 17, item 4)


def _student(round_hidden: bool):
    pkg = make_package(preset_shape("scenes-teacher"), jitter=0.02)
    full = pkg.model.shape.params()
    task = PruneTask(
        pkg.model, PruneCfg(round_hidden_to_head=round_hidden), {t: 0.5 * full[t] for t in TOWERS}, mask_steps=10
    )
    overshoot(task)
    small = task.finalize()
    return dataclasses.replace(pkg, model=small), full


def _export(src, out):
    return CliRunner().invoke(main, ["export", str(src), "--format", "open_clip", "--out", str(out)])


def test_learned_mask_student_with_round_hidden_to_head_exports_to_open_clip(tmp_path):
    pkg, full = _student(round_hidden=True)
    got = pkg.model.num_params()
    for t in TOWERS:
        s = pkg.model.shape.tower(t)
        assert s.width % s.head_dim == 0 and s.width != 128, s  # rounded, still pruned
        assert 0.98 * 0.5 * full[t] <= got[t] <= 0.5 * full[t]
    src = save_model_dir(pkg, tmp_path / "student")
    result = _export(src, tmp_path / "oc")  # the export loads the folder back with open_clip and compares
    assert result.exit_code == 0, result.output
    assert (tmp_path / "oc" / "open_clip_model.safetensors").is_file()


def test_unrounded_learned_mask_student_says_how_to_get_an_exportable_one(tmp_path):
    pkg, _ = _student(round_hidden=False)
    assert pkg.model.shape.vision.width == OPEN_HIDDEN  # the quickstart-auto case of issue 17
    src = save_model_dir(pkg, tmp_path / "student")
    result = _export(src, tmp_path / "oc")
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert f"hidden width {OPEN_HIDDEN} is not a multiple of its head size 32" in out
    assert "prune.round_hidden_to_head=true" in out and "prune.hidden=false" in out
    assert not (tmp_path / "oc").exists()
