"""TinyCLIP's four mask rules (prune.lagrangian / log_alpha / eval_gates / sparsity), each checked against its
formula on hand-made gates, beside the defaults they replace (issue 21, item 1)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_package

from tinyclip_edge.common.vocab import TOWERS
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.stages.prune.config import PruneCfg
from tinyclip_edge.compress.stages.prune.masks import BETA, GAMMA, ZETA, HardConcrete, TowerGates
from tinyclip_edge.compress.stages.prune.task import PruneTask


def _task(**cfg) -> PruneTask:
    model = make_package().model
    budget = {t: 0.5 * model.shape.params()[t] for t in TOWERS}
    return PruneTask(model, PruneCfg(**cfg), budget, mask_steps=10)


def _set(task: PruneTask, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)


def _p_open(la: torch.Tensor) -> torch.Tensor:  # written out here, not taken from masks.py
    return torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA))


# ------------------------------------------------------------------------------ (i) the Lagrangian


@pytest.mark.parametrize("sparsity_gap", [0.3, -0.3])  # s below the target, then above it
def test_one_sided_lagrangian_is_tinyclips_formula(sparsity_gap):
    task = _task(lagrangian="one-sided")
    assert task.lambdas.detach().flatten().tolist() == [10.0] * 4  # TinyCLIP's lambda_1 = lambda_2 = 10
    _set(task)
    with torch.no_grad():
        task.lambdas.copy_(torch.tensor([[3.0, 5.0], [7.0, 11.0]]))
    step = 9  # the ramp is over: t is the final target
    expected = 0.0
    for gi, towers in enumerate(task.groups):
        s = float(task.expected_sparsity(towers).detach())
        t = task.target_sparsity(step, towers)
        gap = max(t - s, 0.0)
        lam = task.lambdas.detach()
        expected += float(lam[gi, 0]) * gap + float(lam[gi, 1]) * gap**2
    got = float(task.extra_losses(step)["lagrangian"])
    assert got == pytest.approx(expected, rel=1e-5)
    # shift the target so s is clearly below it (penalised) or above it (free under the one-sided rule)
    for t in task.budget:
        task.budget[t] = (1 - (float(task.expected_sparsity([t]).detach()) + sparsity_gap)) * task._full[t]
    got = float(task.extra_losses(step)["lagrangian"])
    if sparsity_gap > 0:
        assert got == pytest.approx(3.0 * 0.3 + 5.0 * 0.09 + 7.0 * 0.3 + 11.0 * 0.09, rel=1e-4)
    else:
        assert got == 0.0


def test_two_sided_lagrangian_stays_the_default():
    task = _task()
    assert PruneCfg().lagrangian == "two-sided" and task.lambdas.abs().max() == 0  # lambdas start at 0
    _set(task, 1)
    with torch.no_grad():
        task.lambdas.copy_(torch.tensor([[3.0, 5.0], [7.0, 11.0]]))
    for t in task.budget:  # s 0.3 above the target: the two-sided penalty counts it (negative lambda1 term)
        task.budget[t] = (1 - (float(task.expected_sparsity([t]).detach()) - 0.3)) * task._full[t]
    got = float(task.extra_losses(9)["lagrangian"])
    assert got == pytest.approx(3.0 * 0.3 + 5.0 * 0.09 + 7.0 * 0.3 + 11.0 * 0.09, rel=1e-4)
    assert task.cfg.sparsity == "tower" and task.cfg.log_alpha == "free" and task.cfg.eval_gates == "louizos"


# ------------------------------------------------------------------------------ (ii) log-alpha start and bound


def test_clamped_log_alpha_starts_at_10_and_stays_within_4_6():
    task = _task(log_alpha="clamped")
    la = torch.cat([p.detach().flatten() for p in task.gates.parameters()])
    assert (la - 10).abs().max() < 0.1  # TinyCLIP: init 10 (plus the tie-breaking noise)
    with torch.no_grad():
        first = next(iter(task.gates.parameters()))
        first[0], first[1], first[2] = -20.0, 3.0, -4.0
    task.after_step(0)
    la = torch.cat([p.detach().flatten() for p in task.gates.parameters()])
    bound = math.log(100)  # TinyCLIP's clamp: log(1e-2) .. log(1e2)
    assert la.max() == pytest.approx(bound) and la.min() == pytest.approx(-bound)
    assert first[1] == 3.0 and first[2] == -4.0  # inside the bound: untouched
    # positive control: the default neither starts at 10 nor clamps
    free = _task()
    assert (torch.cat([p.detach().flatten() for p in free.gates.parameters()]) - 2).abs().max() < 0.1
    with torch.no_grad():
        next(iter(free.gates.parameters()))[0] = -20.0
    free.after_step(0)
    assert next(iter(free.gates.parameters()))[0] == -20.0


# ------------------------------------------------------------------------------ (iii) evaluation gates


def test_cofi_evaluation_gates_zero_the_expected_number_of_closed_units():
    la = torch.tensor([3.0, 0.5, -1.0, -1.2, -1.4, 4.0, -1.3, -1.1])
    hc = HardConcrete(len(la))
    with torch.no_grad():
        hc.log_alpha.copy_(la)
    soft = torch.sigmoid(0.8 * la / (2 / 3))
    closed = len(la) - float(_p_open(la).sum())  # expected number of closed gates: 2.13
    assert round(closed) == 2  # the hand-made case: the two lowest (-1.4, -1.3) go to 0
    want = soft.clone()
    want[[4, 6]] = 0
    torch.testing.assert_close(hc.value("cofi").detach(), want)
    # the default: Louizos' clamp(sigmoid(la) * 1.2 - 0.1, 0, 1), no ranking: every gate here stays open
    louizos = (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(hc.value("louizos").detach(), louizos)
    assert float(hc.value("louizos").min()) > 0 and float(hc.value("cofi")[4]) == 0


def test_cofi_evaluation_gates_are_folded_into_the_student():
    task = _task(eval_gates="cofi")
    _set(task, 2)
    plan = task.plan()
    masks = task.deterministic_masks(plan)
    g = task.gates["image"]
    kept = plan.image.heads[0]
    want = g.heads[0].ranked().detach()[kept]
    torch.testing.assert_close(masks["image"].blocks[0].heads[kept], want)
    small = task.finalize()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (task.model.encode_image(images, masks=masks["image"]) - small.encode_image(images)).abs().max()
    assert diff <= 1e-5


# ------------------------------------------------------------------------------ (iv) sparsity over the blocks


def test_block_sparsity_is_tinyclips_count():
    model = make_package().model
    s = model.shape.vision
    gates = TowerGates(s, hidden=True, layers=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    kept, full = gates.expected_block_weights()
    # TinyCLIP (l0module.py): outer(hidden, heads * mha) * params_per_head / hidden + 2 * outer(hidden, neurons * ffn)
    h, d, n_heads = s.width, s.head_dim, s.heads[0]
    per_head = (4 * h * h + 4 * h) // n_heads  # params_per_head of a teacher layer (h = heads x head_dim)
    hid = _p_open(gates.hidden.log_alpha.detach())
    heads = torch.stack([_p_open(x.log_alpha.detach()) for x in gates.heads])
    mha = torch.stack([_p_open(x.log_alpha.detach())[0] for x in gates.attn_layer])
    neurons = torch.stack([_p_open(x.log_alpha.detach()) for x in gates.mlp])
    ffn = torch.stack([_p_open(x.log_alpha.detach())[0] for x in gates.mlp_layer])
    want = torch.outer(hid, (heads * mha[:, None]).flatten()).sum() * per_head / h
    want = want + 2 * torch.outer(hid, (neurons * ffn[:, None]).flatten()).sum()
    mlp = s.mlp[0]
    prunable = (4 * h * h + 4 * h + 2 * h * mlp + h + mlp) * s.layers  # TinyCLIP's prunable_model_size
    assert h == n_heads * d
    assert float(kept) == pytest.approx(float(want), rel=1e-5) and full == prunable
    # and the task uses it for s when asked (the default counts every parameter of the tower, embeddings too)
    task = _task(sparsity="blocks")
    k, f = zip(*(task.gates[t].expected_block_weights() for t in TOWERS))
    assert float(task.expected_sparsity(list(TOWERS))) == pytest.approx(1 - float(sum(k)) / sum(f), rel=1e-6)
    default = _task()
    exp = default.expected_params()
    whole = 1 - float(exp["image"] + exp["text"]) / sum(default._full[t] for t in TOWERS)
    assert float(default.expected_sparsity(list(TOWERS))) == pytest.approx(whole, rel=1e-6)
    assert float(default.expected_sparsity(list(TOWERS))) != pytest.approx(float(task.expected_sparsity(list(TOWERS))))


# ------------------------------------------------------------------------------ recipes


def test_tinyclip_rules_run_through_a_prune_stage(tmp_path, tiny_package):
    from tinyclip_edge.compress.runner import run_compress
    from tinyclip_edge.models import load_model_dir, save_model_dir

    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    rules = ["lagrangian=one-sided", "log_alpha=clamped", "eval_gates=cofi", "sparsity=blocks"]
    recipe = load_recipe(
        "quickstart-auto",
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher={teacher}",
            "eval.data=null",
            "stages=[{name: s1, method: prune, target: 0.5, steps: 4, batch_size: 8, prune: {mask_steps: 0.5}}]",
            *(f"stages.0.prune.{r}" for r in rules),
        ],
    )
    result = run_compress(recipe)
    student = load_model_dir(result.stage_dirs[0]).model.num_params()
    full = tiny_package.model.num_params()
    for t in TOWERS:
        assert abs(student[t] / full[t] - 0.5) <= 0.02 * 0.5
