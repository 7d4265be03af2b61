"""Hard-concrete L0 gates (Louizos et al. 2018, as CoFi and TinyCLIP use them) over a tower's structure.

Per tower: one gate per residual (hidden) channel, shared by every layer since they all write into the
same stream; one per attention head and per MLP neuron of each layer; optionally one per attention and
per MLP sub-layer. The expected number of kept parameters is a differentiable function of the gates'
keep-probabilities (``expected_params``), using the same formula that counts a materialised model.

Materialising: units are ranked by their log-alpha (how strongly training wanted them kept) and the
highest-ranked are kept until the parameter budget is used up (a global threshold, then a greedy
fill), so the dense student lands on the budget instead of wherever rounding would put it. The kept
units keep their deterministic gate values (``HardConcrete.deterministic``), multiplied into the weights
(``compress/folding.py``), so the dense student computes what the masked network computes with those
gates: ``deterministic_masks`` builds the masks that define it. A kept residual channel whose gate is
exactly 0 carries nothing and would still count in LayerNorm's statistics, so it is dropped
(``drop_closed_channels``, unless a width floor needs it): the student can land below its budget, never above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..common.errors import UserError
from ..models.clip import TowerMasks
from ..models.layers import BlockMasks
from ..models.shape import TowerShape, block_param_count
from .slicing import TowerPlan

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature and stretch interval of the hard-concrete distribution
INIT_LOG_ALPHA = 2.0  # P(kept) ~ 0.97 at the start: everything begins switched on, and
# the gates can move within the few hundred steps of a CPU run


class HardConcrete(nn.Module):
    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__()
        # a little noise breaks ties between units; seeded, so a run is reproducible
        self.log_alpha = nn.Parameter(torch.full((n,), INIT_LOG_ALPHA) + 0.01 * torch.randn(n, generator=generator))

    def sample(self, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def deterministic(self) -> Tensor:
        """The test-time gate (Louizos et al. 2018, eq. 13): clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
        About 0.957 at the initial log-alpha; exactly 0 below log_alpha = -2.40, exactly 1 above 2.40."""
        z = torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA
        return z.clamp(0, 1)

    def prob_open(self) -> Tensor:
        """P(gate > 0), the expected L0 norm per unit."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class TowerGates(nn.Module):
    def __init__(self, shape: TowerShape, hidden: bool, layers: bool, generator: torch.Generator | None = None):
        super().__init__()
        self.shape = shape
        g = generator
        self.hidden = HardConcrete(shape.width, g) if hidden else None
        self.heads = nn.ModuleList(HardConcrete(h, g) for h in shape.heads)
        self.mlp = nn.ModuleList(HardConcrete(m, g) for m in shape.mlp)
        self.attn_layer = nn.ModuleList(HardConcrete(1, g) for _ in shape.heads) if layers else None
        self.mlp_layer = nn.ModuleList(HardConcrete(1, g) for _ in shape.mlp) if layers else None

    def sample(self, generator: torch.Generator | None) -> TowerMasks:
        hidden = self.hidden.sample(generator) if self.hidden is not None else None
        blocks = []
        for i in range(len(self.heads)):
            blocks.append(
                BlockMasks(
                    hidden,
                    self.heads[i].sample(generator),
                    self.mlp[i].sample(generator),
                    self.attn_layer[i].sample(generator)[0] if self.attn_layer is not None else None,
                    self.mlp_layer[i].sample(generator)[0] if self.mlp_layer is not None else None,
                )
            )
        return TowerMasks(hidden, blocks)

    def expected_params(self, embed_params_per_channel: Tensor | float, const: float) -> Tensor:
        """E[kept parameters] of this tower, differentiable in the gates' log-alphas."""
        s = self.shape
        dev = self.heads[0].log_alpha.device
        width = self.hidden.prob_open().sum() if self.hidden is not None else torch.tensor(float(s.width), device=dev)
        heads = [g.prob_open().sum() for g in self.heads]
        mlp = [g.prob_open().sum() for g in self.mlp]
        attn_on = [g.prob_open()[0] for g in self.attn_layer] if self.attn_layer is not None else [1.0] * len(heads)
        mlp_on = [g.prob_open()[0] for g in self.mlp_layer] if self.mlp_layer is not None else [1.0] * len(mlp)
        return embed_params_per_channel * width + const + block_param_count(s, width, heads, mlp, attn_on, mlp_on)

    def diverged(self) -> bool:
        return any(not torch.isfinite(p).all() for p in self.parameters())


# ------------------------------------------------------------------------------ materialisation


@dataclass
class _Units:
    """Every prunable unit of a tower with its score, for threshold search."""

    hidden: Tensor
    heads: list[Tensor]
    mlp: list[Tensor]
    attn_layer: list[float] | None
    mlp_layer: list[float] | None


def _units(g: TowerGates) -> _Units:
    la = lambda m: m.log_alpha.detach().float().cpu()  # noqa: E731
    return _Units(
        la(g.hidden) if g.hidden is not None else torch.full((g.shape.width,), math.inf),
        [la(h) for h in g.heads],
        [la(m) for m in g.mlp],
        [float(la(a)[0]) for a in g.attn_layer] if g.attn_layer is not None else None,
        [float(la(a)[0]) for a in g.mlp_layer] if g.mlp_layer is not None else None,
    )


def _top(scores: Tensor, tau: float, floor: int) -> list[int]:
    keep = (scores >= tau).nonzero().flatten().tolist()
    if len(keep) < floor:
        keep = torch.topk(scores, min(floor, len(scores))).indices.tolist()
    return sorted(keep)


@dataclass
class Floor:
    """The least a materialised tower keeps: residual channels, and heads and MLP neurons in every layer."""

    hidden: int = 1
    heads: int = 0
    mlp: int = 0


def plan_at(u: _Units, tau: float, allow_empty_layers: bool, floor: Floor | int = 1) -> TowerPlan:
    """Keep every unit scoring >= tau. Without layer gates each layer keeps at least one head and one
    neuron (a sub-layer cannot disappear); `floor` (an int: residual channels only) raises those minimums,
    and a floor of heads or neurons also keeps the layer gates from removing a sub-layer."""
    fl = floor if isinstance(floor, Floor) else Floor(hidden=floor)
    hidden = _top(u.hidden, tau, fl.hidden)
    heads, mlp = [], []
    sub = 0 if allow_empty_layers else 1
    for i in range(len(u.heads)):
        attn_off = u.attn_layer is not None and u.attn_layer[i] < tau and not fl.heads
        mlp_off = u.mlp_layer is not None and u.mlp_layer[i] < tau and not fl.mlp
        heads.append([] if attn_off else _top(u.heads[i], tau, max(sub, fl.heads)))
        mlp.append([] if mlp_off else _top(u.mlp[i], tau, max(sub, fl.mlp)))
    layers = list(range(len(u.heads)))
    return TowerPlan(layers, hidden, heads, mlp)


def drop_empty_layers(plan: TowerPlan) -> TowerPlan:
    keep = [i for i in range(len(plan.layers)) if plan.heads[i] or plan.mlp[i]]
    return TowerPlan(
        [plan.layers[i] for i in keep], plan.hidden, [plan.heads[i] for i in keep], [plan.mlp[i] for i in keep]
    )


def budget_plans(
    gates: dict[str, TowerGates],
    count: callable,
    budget: dict[str, float],
    joint: bool,
    allow_empty_layers: bool,
    floors: dict[str, TowerShape] | None = None,
) -> dict[str, TowerPlan]:
    """The plans with the most units that fit the budget: per tower, or for both towers together.

    `count(tower, plan) -> params` counts a plan exactly. A global log-alpha threshold is bisected, then the
    remaining units are added greedily by score while they still fit. The residual stream never gets
    narrower than one attention head. `floors`: per tower, a shape the plan must contain (set by the chain
    planner, compress/chain.py, so that the next stage's planned shape can still be cut out of this one).
    """
    units = {t: _units(g) for t, g in gates.items()}
    floor = {t: _floor(g.shape, (floors or {}).get(t)) for t, g in gates.items()}
    groups = [list(gates)] if joint else [[t] for t in gates]
    out: dict[str, TowerPlan] = {}
    for towers in groups:
        limit = sum(budget[t] for t in towers)
        scores = (
            torch.cat(
                [
                    torch.cat([units[t].hidden[units[t].hidden.isfinite()], *units[t].heads, *units[t].mlp])
                    for t in towers
                ]
            )
            .sort(descending=True)
            .values
        )
        total = lambda tau, towers=towers: sum(
            count(t, plan_at(units[t], tau, allow_empty_layers, floor[t])) for t in towers
        )
        smallest = sum(count(t, plan_at(units[t], math.inf, allow_empty_layers, floor[t])) for t in towers)
        if smallest > limit:
            with_layers = sum(count(t, drop_empty_layers(plan_at(units[t], math.inf, True, floor[t]))) for t in towers)
            how = (
                "enable prune.layers: true (whole attention/MLP sub-layers may go) or raise the target"
                if not allow_empty_layers and with_layers <= limit
                else "raise the target"
            )
            if floors:
                how = (
                    "raise this stage's target: it must keep the shape the next stage inherits "
                    "(compress/chain.py), or lower that stage's target"
                )
            raise UserError(
                f"the pruning target for {' + '.join(towers)} ({limit:,.0f} parameters) is below the smallest "
                f"student it can produce ({smallest:,} parameters): it would remove every head of a layer; {how}"
            )
        lo, hi = 0, len(scores) - 1  # find the smallest index (lowest tau) that still fits
        best = math.inf
        while lo <= hi:
            mid = (lo + hi) // 2
            tau = float(scores[mid])
            if total(tau) <= limit:
                best, lo = tau, mid + 1
            else:
                hi = mid - 1
        plans = {t: plan_at(units[t], best, allow_empty_layers, floor[t]) for t in towers}
        _greedy_fill(plans, {t: units[t] for t in towers}, count, limit)
        out.update({t: drop_empty_layers(p) for t, p in plans.items()})
    return out


def _floor(shape: TowerShape, need: TowerShape | None) -> Floor:
    base = min(shape.width, shape.head_dim)
    if need is None:
        return Floor(hidden=base)
    return Floor(
        hidden=max(base, min(shape.width, need.width)), heads=max(need.heads, default=0), mlp=max(need.mlp, default=0)
    )


def _greedy_fill(plans: dict[str, TowerPlan], units: dict[str, _Units], count: callable, limit: float) -> None:
    """Add the best remaining heads and neurons (fine-grained units) while they fit the budget; a
    sub-layer the threshold removed stays removed."""
    cands = []
    for t, u in units.items():
        p = plans[t]
        for i in range(len(u.heads)):
            for kind, scores, kept in (("heads", u.heads[i], p.heads[i]), ("mlp", u.mlp[i], p.mlp[i])):
                if kept:
                    have = set(kept)
                    cands += [(float(scores[j]), t, kind, i, j) for j in range(len(scores)) if j not in have]
    used = sum(count(t, p) for t, p in plans.items())
    for _, t, kind, i, unit in sorted(cands, reverse=True):
        lst = getattr(plans[t], kind)[i]
        lst.append(unit)
        new = sum(count(tt, p) for tt, p in plans.items())
        if new <= limit:
            used = new
        else:
            lst.pop()
        if limit - used < 1:
            break
    for p in plans.values():
        for lst in (*p.heads, *p.mlp):
            lst.sort()


def masks_for_plan(plan: TowerPlan, shape: TowerShape, device: torch.device | str = "cpu") -> TowerMasks:
    """0/1 masks that make the full model compute exactly what the plan's sliced model computes."""
    hidden = torch.zeros(shape.width, device=device)
    hidden[plan.hidden] = 1
    kept = dict(zip(plan.layers, zip(plan.heads, plan.mlp)))
    blocks = []
    for li in range(shape.layers):
        heads, mlp = kept.get(li, ([], []))
        h = torch.zeros(shape.heads[li], device=device)
        h[heads] = 1
        m = torch.zeros(shape.mlp[li], device=device)
        m[mlp] = 1
        blocks.append(
            BlockMasks(
                hidden,
                h,
                m,
                torch.tensor(1.0 if heads else 0.0, device=device),
                torch.tensor(1.0 if mlp else 0.0, device=device),
            )
        )
    return TowerMasks(hidden, blocks)


def hidden_floor(shape: TowerShape, need: TowerShape | None) -> int:
    """The fewest residual channels a materialised tower keeps (the same floor ``budget_plans`` applies)."""
    return _floor(shape, need).hidden


def drop_closed_channels(plan: TowerPlan, gates: TowerGates, min_hidden: int = 1) -> TowerPlan:
    """The plan without residual channels whose deterministic gate is exactly 0.

    Such a channel is zero everywhere in the masked network, and the masked LayerNorm leaves it out of its
    statistics; a sliced model that kept it would count it there, so keeping it would not be exact. Only a
    floor (`min_hidden`: one attention head's width, or the shape the next stage of a chain inherits) keeps
    closed channels, the highest-scoring first; then the student differs from the masked network by those
    channels' weight in LayerNorm's statistics."""
    if gates.hidden is None:
        return plan
    la = gates.hidden.log_alpha.detach().cpu()
    z = gates.hidden.deterministic().detach().cpu()
    open_ = [c for c in plan.hidden if z[c] > 0]
    closed = sorted((c for c in plan.hidden if z[c] <= 0), key=lambda c: -float(la[c]))
    need = max(1, min(min_hidden, len(plan.hidden))) - len(open_)
    return TowerPlan(plan.layers, sorted(open_ + closed[: max(0, need)]), plan.heads, plan.mlp)


@torch.no_grad()
def deterministic_masks(plan: TowerPlan, gates: TowerGates) -> TowerMasks:
    """The masks of the network a materialised plan computes: each kept unit at its deterministic gate value,
    every other unit at 0 (``masks_for_plan`` times the gates)."""
    dev = gates.heads[0].log_alpha.device
    m = masks_for_plan(plan, gates.shape, dev)
    hidden = m.hidden * gates.hidden.deterministic() if gates.hidden is not None else m.hidden
    blocks = []
    for i, b in enumerate(m.blocks):
        attn = b.attn_gate * gates.attn_layer[i].deterministic()[0] if gates.attn_layer is not None else b.attn_gate
        mlp = b.mlp_gate * gates.mlp_layer[i].deterministic()[0] if gates.mlp_layer is not None else b.mlp_gate
        blocks.append(
            BlockMasks(
                hidden, b.heads * gates.heads[i].deterministic(), b.mlp * gates.mlp[i].deterministic(), attn, mlp
            )
        )
    return TowerMasks(hidden, blocks)
