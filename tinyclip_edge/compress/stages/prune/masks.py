"""Hard-concrete L0 gates (Louizos et al. 2018, as CoFi and TinyCLIP use them) over a tower's structure.

Per tower: one gate per residual (hidden) channel, shared by every layer since they all write into the
same stream; one per attention head and per MLP neuron of each layer; optionally one per attention and
per MLP sub-layer. The expected number of kept parameters is a differentiable function of the gates'
keep-probabilities (``expected_params``), using the same formula that counts a materialised model;
``expected_block_weights`` is TinyCLIP's count instead (the blocks only, ``prune.sparsity: blocks``).

Materialising: units are ranked by their log-alpha (how strongly training wanted them kept) and the
highest-ranked are kept until the parameter budget is used up (a global threshold, then a greedy
fill), so the dense student lands on the budget whatever the gates did during training (CoFi's
deterministic gates do the same: keep by score, up to the expected size). The kept units keep their
deterministic gate values (``HardConcrete.value``: Louizos' clamp by default, CoFi's ranked gates with
``prune.eval_gates: cofi``), multiplied into the weights (``compress/stages/prune/folding.py``), so the dense student
computes what the masked network computes with those gates: ``deterministic_masks`` builds the masks that
define it. Units whose gate value is 0 rank below every open one, so the budget keeps them only when the
open units cannot fill it; such a unit starts at zero weight (dead, trainable again in the distil phase).
A kept residual channel at 0 also counts in the sliced LayerNorm's statistics, which the masked network
leaves out, so closed residual channels rank last of all: the student differs from the masked network only
when every head and neuron is kept and the budget still has room, or when a width floor needs them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from ....common.errors import UserError
from ....models.clip import TowerMasks
from ....models.layers import BlockMasks
from ....models.shape import TowerShape, block_param_count
from ...slicing import TowerPlan

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature and stretch interval of the hard-concrete distribution
INIT_LOG_ALPHA = 2.0  # P(kept) ~ 0.97 at the start: everything begins switched on, and
# the gates can move within the few hundred steps of a CPU run
# TinyCLIP's rules (l0module.py): log-alpha starts at 10 and is clamped to +-log(100) after every step;
# its evaluation gates are CoFi's sigmoid(0.8 * log_alpha / beta) (0.8 from Wang et al. 2020)
TINYCLIP_INIT_LOG_ALPHA = 10.0
LOG_ALPHA_BOUND = math.log(100.0)
COFI_SOFT = 0.8
EvalGates = Literal["louizos", "cofi"]


class HardConcrete(nn.Module):
    def __init__(self, n: int, generator: torch.Generator | None = None, init: float = INIT_LOG_ALPHA):
        super().__init__()
        # a little noise breaks ties between units; seeded, so a run is reproducible
        self.log_alpha = nn.Parameter(torch.full((n,), init) + 0.01 * torch.randn(n, generator=generator))

    def sample(self, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def deterministic(self) -> Tensor:
        """The test-time gate (Louizos et al. 2018, eq. 13): clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
        About 0.957 at the initial log-alpha; exactly 0 below log_alpha = -2.40, exactly 1 above 2.40."""
        z = torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA
        return z.clamp(0, 1)

    def ranked(self) -> Tensor:
        """CoFi's (and TinyCLIP's) evaluation gate: sigmoid(0.8 * log_alpha / beta), then the
        round(expected number of closed gates) = round(n - sum P(open)) lowest of this group set to 0."""
        la = self.log_alpha.detach()  # an evaluation rule: no gradient flows through the ranking
        soft = torch.sigmoid(COFI_SOFT * la / BETA)
        zeros = round(len(soft) - float(torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)).sum()))
        if zeros > 0:
            soft[torch.topk(soft, zeros, largest=False).indices] = 0
        return soft

    def value(self, rule: EvalGates) -> Tensor:
        """The gate's value in the materialised student under `rule` (``prune.eval_gates``)."""
        return self.ranked() if rule == "cofi" else self.deterministic()

    def prob_open(self) -> Tensor:
        """P(gate > 0), the expected L0 norm per unit."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class TowerGates(nn.Module):
    def __init__(
        self,
        shape: TowerShape,
        hidden: bool,
        layers: bool,
        generator: torch.Generator | None = None,
        init: float = INIT_LOG_ALPHA,
        eval_gates: EvalGates = "louizos",
    ):
        super().__init__()
        self.shape, self.eval_gates = shape, eval_gates
        g = generator
        hc = lambda n: HardConcrete(n, g, init)  # noqa: E731
        self.hidden = hc(shape.width) if hidden else None
        self.heads = nn.ModuleList(hc(h) for h in shape.heads)
        self.mlp = nn.ModuleList(hc(m) for m in shape.mlp)
        self.attn_layer = nn.ModuleList(hc(1) for _ in shape.heads) if layers else None
        self.mlp_layer = nn.ModuleList(hc(1) for _ in shape.mlp) if layers else None

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

    def expected_block_weights(self) -> tuple[Tensor, float]:
        """TinyCLIP's sparsity count (``prune.sparsity: blocks``): (E[kept], all) over the transformer blocks only.

        Per layer l with H_l heads: E[W] * E[heads_l] * (4 * head_dim + 4 / H_l) for attention (q, k, v and
        output weights per channel-head pair, the attention biases spread over the pairs as TinyCLIP does) and
        2 * E[W] * E[neurons_l] for the MLP weights. The total also holds the MLP biases (W + mlp_l per layer)
        that the expectation leaves out, as TinyCLIP's ``prunable_model_size`` does; embeddings and LayerNorms
        are in neither."""
        s = self.shape
        dev = self.heads[0].log_alpha.device
        width = self.hidden.prob_open().sum() if self.hidden is not None else torch.tensor(float(s.width), device=dev)
        kept: Tensor = torch.zeros((), device=dev)
        full = 0.0
        for i, (h, m) in enumerate(zip(s.heads, s.mlp)):
            pair = 4 * s.head_dim + (4 / h if h else 0.0)
            a = self.attn_layer[i].prob_open()[0] if self.attn_layer is not None else 1.0
            b = self.mlp_layer[i].prob_open()[0] if self.mlp_layer is not None else 1.0
            kept = kept + width * self.heads[i].prob_open().sum() * a * pair
            kept = kept + 2 * width * self.mlp[i].prob_open().sum() * b
            full += s.width * h * pair + 2 * s.width * m + s.width + m
        return kept, full

    @torch.no_grad()
    def clamp_(self) -> None:
        """TinyCLIP's bound on log-alpha (``prune.log_alpha: clamped``), applied after every step."""
        for p in self.parameters():
            p.clamp_(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)

    def diverged(self) -> bool:
        return any(not torch.isfinite(p).all() for p in self.parameters())


# ------------------------------------------------------------------------------ materialisation

# Units whose gate value is 0 rank below every open unit, closed residual channels below everything
# (see the module docstring). Scores are float64 so that these offsets leave log-alpha's digits intact.
CLOSED, CLOSED_CHANNEL = 1e9, 2e9


@dataclass
class _Units:
    """Every prunable unit of a tower with its score, for threshold search."""

    hidden: Tensor
    heads: list[Tensor]
    mlp: list[Tensor]
    attn_layer: list[float] | None
    mlp_layer: list[float] | None
    head_cap: int | None = None  # the most heads a layer may keep (round_hidden_to_head)


def _score(hc: HardConcrete, rule: EvalGates, closed: float) -> Tensor:
    la = hc.log_alpha.detach().double().cpu()
    return la - closed * (hc.value(rule).detach().cpu() <= 0).double()


def _units(g: TowerGates) -> _Units:
    r = g.eval_gates
    return _Units(
        _score(g.hidden, r, CLOSED_CHANNEL) if g.hidden is not None else torch.full((g.shape.width,), math.inf),
        [_score(h, r, CLOSED) for h in g.heads],
        [_score(m, r, CLOSED) for m in g.mlp],
        [float(_score(a, r, CLOSED)[0]) for a in g.attn_layer] if g.attn_layer is not None else None,
        [float(_score(a, r, CLOSED)[0]) for a in g.mlp_layer] if g.mlp_layer is not None else None,
    )


def _top(scores: Tensor, tau: float, floor: int, cap: int | None = None) -> list[int]:
    keep = (scores >= tau).nonzero().flatten().tolist()
    if len(keep) < floor:
        keep = torch.topk(scores, min(floor, len(scores))).indices.tolist()
    if cap is not None and len(keep) > cap:
        keep = [keep[j] for j in torch.topk(scores[keep], cap).indices.tolist()]
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
        heads.append([] if attn_off else _top(u.heads[i], tau, max(sub, fl.heads), u.head_cap))
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
    round_hidden: bool = False,
) -> dict[str, TowerPlan]:
    """The plans with the most units that fit the budget: per tower, or for both towers together.

    `count(tower, plan) -> params` counts a plan exactly. A global score threshold is bisected, then the
    remaining units are added greedily by score while they still fit. The residual stream never gets
    narrower than one attention head. `floors`: per tower, a shape the plan must contain (set by the chain
    planner, compress/chain.py, so that the next stage's planned shape can still be cut out of this one).
    `round_hidden`: the residual width is a multiple of the head size and holds every layer's heads (what
    open_clip needs, ``prune.round_hidden_to_head``); the budget is then filled around that width.
    """
    units = {t: _units(g) for t, g in gates.items()}
    floor = {t: _floor(g.shape, (floors or {}).get(t)) for t, g in gates.items()}
    groups = [list(gates)] if joint else [[t] for t in gates]
    out: dict[str, TowerPlan] = {}
    for towers in groups:
        limit = sum(budget[t] for t in towers)
        _check_fits(units, floor, towers, count, limit, allow_empty_layers, bool(floors))
        plans = _fill({t: units[t] for t in towers}, floor, count, limit, allow_empty_layers)
        if round_hidden:
            plans = _round_hidden(plans, gates, units, floor, count, limit, allow_empty_layers)
        out.update({t: drop_empty_layers(p) for t, p in plans.items()})
    return out


def _smallest(units: dict[str, _Units], floor: dict[str, Floor], count: callable, allow_empty: bool) -> int:
    return sum(count(t, plan_at(u, math.inf, allow_empty, floor[t])) for t, u in units.items())


def _check_fits(units, floor, towers, count, limit, allow_empty_layers, chained) -> None:
    smallest = _smallest({t: units[t] for t in towers}, floor, count, allow_empty_layers)
    if smallest <= limit:
        return
    with_layers = sum(count(t, drop_empty_layers(plan_at(units[t], math.inf, True, floor[t]))) for t in towers)
    how = (
        "enable prune.layers: true (whole attention/MLP sub-layers may go) or raise the target"
        if not allow_empty_layers and with_layers <= limit
        else "raise the target"
    )
    if chained:
        how = (
            "raise this stage's target: it must keep the shape the next stage inherits "
            "(compress/chain.py), or lower that stage's target"
        )
    raise UserError(
        f"the pruning target for {' + '.join(towers)} ({limit:,.0f} parameters) is below the smallest "
        f"student it can produce ({smallest:,} parameters): it would remove every head of a layer; {how}"
    )


def _fill(
    units: dict[str, _Units], floor: dict[str, Floor], count: callable, limit: float, allow_empty_layers: bool
) -> dict[str, TowerPlan]:
    """The lowest score threshold whose plans fit `limit` (bisected), then the greedy fill."""
    scores = torch.cat([torch.cat([u.hidden[u.hidden.isfinite()], *u.heads, *u.mlp]) for u in units.values()])
    scores = scores.sort(descending=True).values

    def total(tau: float) -> int:
        return sum(count(t, plan_at(u, tau, allow_empty_layers, floor[t])) for t, u in units.items())

    lo, hi = 0, len(scores) - 1  # find the smallest index (lowest tau) that still fits
    best = math.inf
    while lo <= hi:
        mid = (lo + hi) // 2
        tau = float(scores[mid])
        if total(tau) <= limit:
            best, lo = tau, mid + 1
        else:
            hi = mid - 1
    plans = {t: plan_at(u, best, allow_empty_layers, floor[t]) for t, u in units.items()}
    _greedy_fill(plans, units, count, limit)
    return plans


def _round_hidden(
    plans: dict[str, TowerPlan],
    gates: dict[str, TowerGates],
    units: dict[str, _Units],
    floor: dict[str, Floor],
    count: callable,
    limit: float,
    allow_empty_layers: bool,
) -> dict[str, TowerPlan]:
    """Plans whose residual widths are multiples of the head size: of the widths whose plans land within 2%
    of the budget, the nearest to the unrounded ones. For each width tried (nearest first), a tower keeps
    its best-scoring channels, caps every layer at width / head_dim heads, and fills the budget again."""
    widths = {}
    for t in plans:
        s, k = gates[t].shape, len(plans[t].hidden)
        if gates[t].hidden is None:
            widths[t] = [None]
            continue
        d = s.head_dim
        least = max(d, -(-floor[t].hidden // d) * d)
        widths[t] = sorted(range(least, s.width + 1, d), key=lambda w, k=k: (abs(w - k), w))
    combos = sorted(
        itertools.product(*widths.values()),
        key=lambda c: sum(abs(w - len(p.hidden)) for w, p in zip(c, plans.values()) if w is not None),
    )
    fullest = 0
    for combo in combos:
        us = {}
        for t, width in zip(plans, combo):
            u, d = units[t], gates[t].shape.head_dim
            if width is None:
                us[t] = replace(u, head_cap=gates[t].shape.width // d)
                continue
            top = set(torch.topk(u.hidden, width).indices.tolist())
            fixed = torch.tensor([math.inf if c in top else -math.inf for c in range(len(u.hidden))])
            us[t] = replace(u, hidden=fixed, head_cap=width // d)
        if _smallest(us, floor, count, allow_empty_layers) > limit:
            continue
        p = _fill(us, floor, count, limit, allow_empty_layers)
        used = sum(count(t, q) for t, q in p.items())
        if used >= 0.98 * limit:
            return p
        fullest = max(fullest, used)
    raise UserError(
        f"prune.round_hidden_to_head: no residual width that is a multiple of the head size lets "
        f"{' + '.join(plans)} use its budget ({limit:,.0f} parameters; the best such student holds "
        f"{fullest / limit:.0%} of it); raise or lower the target, or set round_hidden_to_head: false"
    )


def _floor(shape: TowerShape, need: TowerShape | None) -> Floor:
    base = min(shape.width, shape.head_dim)
    if need is None:
        return Floor(hidden=base)
    return Floor(
        hidden=max(base, min(shape.width, need.width)), heads=max(need.heads, default=0), mlp=max(need.mlp, default=0)
    )


def _greedy_fill(plans: dict[str, TowerPlan], units: dict[str, _Units], count: callable, limit: float) -> None:
    """Add the best remaining units while they fit the budget, by score, skipping those that do not (so
    heads and neurons fill what a residual channel would overflow, and tied scores still fill it); a
    sub-layer the threshold removed stays removed, and no layer passes its head cap."""
    cands = []
    for t, u in units.items():
        p = plans[t]
        # open residual channels only: a closed one is kept when the threshold reaches it (every other unit
        # kept), and a fixed residual width (scores +-inf), or none, is not filled
        have = set(p.hidden)
        cands += [(float(u.hidden[c]), t, "hidden", -1, c) for c in range(len(u.hidden)) if c not in have]
        cands = [c for c in cands if c[2] != "hidden" or -CLOSED < c[0] < math.inf]
        for i in range(len(u.heads)):
            for kind, scores, kept in (("heads", u.heads[i], p.heads[i]), ("mlp", u.mlp[i], p.mlp[i])):
                if kept:
                    have = set(kept)
                    cands += [(float(scores[j]), t, kind, i, j) for j in range(len(scores)) if j not in have]
    used = sum(count(t, p) for t, p in plans.items())
    for _, t, kind, i, unit in sorted(cands, reverse=True):
        lst = plans[t].hidden if kind == "hidden" else getattr(plans[t], kind)[i]
        if kind == "heads" and units[t].head_cap is not None and len(lst) >= units[t].head_cap:
            continue
        lst.append(unit)
        new = sum(count(tt, p) for tt, p in plans.items())
        if new <= limit:
            used = new
        else:
            lst.pop()
        if limit - used < 1:
            break
    for p in plans.values():
        for lst in (p.hidden, *p.heads, *p.mlp):
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


@torch.no_grad()
def deterministic_masks(plan: TowerPlan, gates: TowerGates) -> TowerMasks:
    """The masks of the network a materialised plan computes: each kept unit at its gate value
    (``HardConcrete.value`` under ``gates.eval_gates``), every other unit at 0 (``masks_for_plan`` times the
    gates). Exact unless the plan keeps a residual channel whose value is 0 (see the module docstring)."""
    dev = gates.heads[0].log_alpha.device
    r = gates.eval_gates
    m = masks_for_plan(plan, gates.shape, dev)
    hidden = m.hidden * gates.hidden.value(r) if gates.hidden is not None else m.hidden
    blocks = []
    for i, b in enumerate(m.blocks):
        attn = b.attn_gate * gates.attn_layer[i].value(r)[0] if gates.attn_layer is not None else b.attn_gate
        mlp = b.mlp_gate * gates.mlp_layer[i].value(r)[0] if gates.mlp_layer is not None else b.mlp_gate
        blocks.append(BlockMasks(hidden, b.heads * gates.heads[i].value(r), b.mlp * gates.mlp[i].value(r), attn, mlp))
    return TowerMasks(hidden, blocks)
