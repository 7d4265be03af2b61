"""Automatic weight inheritance: learn which heads, neurons, channels (and sub-layers) to keep with
hard-concrete masks trained jointly with distillation, under a Lagrangian parameter budget.

    L = distillation losses(student under sampled masks) + lambda1 * (s - t) + lambda2 * (s - t)^2

s is the expected sparsity (1 - E[kept params] / params of the model being pruned), t the target
sparsity, ramped linearly from 0 over the warm-up. The masks' log-alphas descend on L with their own
learning rate; lambda1 and lambda2 *ascend* on L (a separate optimiser with maximize=True), so a
violated budget makes them grow until the masks comply. At the end the gates become deterministic and
the model is materialised (``finalize``) to a smaller dense student with per-layer widths, exactly at the
budget whatever the gates did (``masks.budget_plans``): the kept units' deterministic gate values are
folded into the weights (``folding.py``), so the student is the network that was trained, and the rest
is sliced away.

TinyCLIP's released code differs in four rules, each a ``prune`` option (today's form is the default):
``lagrangian: one-sided`` (lambda1 * max(t - s, 0) + lambda2 * max(t - s, 0)^2, both lambdas starting at
10), ``log_alpha: clamped`` (initialised at 10, clamped to +-4.6 after every step), ``eval_gates: cofi``
(``HardConcrete.ranked``) and ``sparsity: blocks`` (s over the transformer blocks only,
``TowerGates.expected_block_weights``).

Only towers with a target get gates. A tower without one (``target: {image: 0.5}``) trains without masks
and is materialised as it is; with ``joint: true`` the towers that have targets share one budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ....common.errors import UserError
from ....common.vocab import TOWERS
from ....models.clip import ClipModel, TowerMasks
from ....models.shape import ClipShape
from ...slicing import KeepPlan, TowerPlan, full_tower_plan, slice_model
from ...tasks import StageTask, register_task
from .config import PruneCfg
from .folding import fold_masks
from .masks import INIT_LOG_ALPHA, TINYCLIP_INIT_LOG_ALPHA, TowerGates, budget_plans, deterministic_masks


def _embedding_terms(shape: ClipShape, tower: str) -> tuple[float, float]:
    """(parameters per residual channel outside the blocks, constant parameters) of a tower."""
    ts = shape.tower(tower)
    per = ts.embedding_params(1, shape.embed_dim) - ts.embedding_params(0, shape.embed_dim)
    return float(per), float(ts.embedding_params(0, shape.embed_dim))


def noise_seed(seed: int, step: int, micro: int) -> int:
    """A distinct generator seed for every (seed, step, micro-batch) with micro < 1,000,033."""
    return ((seed * 1_000_003 + step) * 1_000_033 + micro) % 2**63


@register_task("prune")
class PruneTask(StageTask):
    def __init__(self, model: ClipModel, cfg: PruneCfg, budget: dict[str, float], mask_steps: int, seed: int = 0):
        super().__init__(model)
        self.cfg, self.budget, self.mask_steps, self.seed = cfg, dict(budget), mask_steps, seed
        gated = [t for t in TOWERS if t in budget]
        if not gated:
            raise UserError("a prune stage needs a target for at least one tower (image or text)")
        gen = torch.Generator().manual_seed(seed)
        init = TINYCLIP_INIT_LOG_ALPHA if cfg.log_alpha == "clamped" else INIT_LOG_ALPHA
        self.gates = nn.ModuleDict(
            {t: TowerGates(model.shape.tower(t), cfg.hidden, cfg.layers, gen, init, cfg.eval_gates) for t in gated}
        )
        groups = [gated] if cfg.joint else [[t] for t in gated]
        self.groups = groups
        # TinyCLIP starts both multipliers at 10: its one-sided penalty only ever pushes them up
        self.lambdas = nn.Parameter(torch.full((len(groups), 2), 10.0 if cfg.lagrangian == "one-sided" else 0.0))
        self._full = {t: float(model.shape.params()[t]) for t in TOWERS}
        self._last: dict[str, float] = {}

    # ---------------------------------------------------------------- forward
    def _generator(self, step: int, micro: int) -> torch.Generator:
        # mask noise is a pure function of (seed, step, micro-batch): a resumed run samples the same masks, and
        # the micro-batches of one step (grad_accum) draw different ones, as one big batch would
        return torch.Generator(device=self.lambdas.device).manual_seed(noise_seed(self.seed, step, micro))

    def encode(self, images: Tensor, ids: Tensor, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        g = self._generator(step, micro)
        img = self.model.encode_image(images, True, self._sample("image", g))
        txt = self.model.encode_text(ids, True, self._sample("text", g))
        return img, txt, self.model.logit_scale.exp()

    def _sample(self, tower: str, g: torch.Generator) -> TowerMasks | None:
        return self.gates[tower].sample(g) if tower in self.gates else None

    def expected_params(self) -> dict[str, Tensor]:
        out = {}
        for t in self.gates:
            per, const = _embedding_terms(self.model.shape, t)
            out[t] = self.gates[t].expected_params(per, const)
        return out

    def target_sparsity(self, step: int, towers: list[str]) -> float:
        final = 1 - sum(self.budget[t] for t in towers) / sum(self._full[t] for t in towers)
        ramp = max(1.0, self.cfg.warmup * self.mask_steps)
        return final * min(1.0, (step + 1) / ramp)

    def expected_sparsity(self, towers: list[str]) -> Tensor:
        """s of a group of towers: over every parameter (default) or the blocks' weights (sparsity: blocks)."""
        if self.cfg.sparsity == "blocks":
            counts = [self.gates[t].expected_block_weights() for t in towers]
            return 1 - sum(c[0] for c in counts) / sum(c[1] for c in counts)
        expected = self.expected_params()
        return 1 - sum(expected[t] for t in towers) / sum(self._full[t] for t in towers)

    def extra_losses(self, step: int) -> dict[str, Tensor]:
        total = torch.zeros((), device=self.lambdas.device)
        for gi, towers in enumerate(self.groups):
            s = self.expected_sparsity(towers)
            gap = s - self.target_sparsity(step, towers)
            if self.cfg.lagrangian == "one-sided":  # only a sparsity below the target is penalised
                gap = torch.clamp(-gap, min=0)
            total = total + self.lambdas[gi, 0] * gap + self.lambdas[gi, 1] * gap**2
            self._last[f"sparsity/{'+'.join(towers)}"] = float(s.detach())
        return {"lagrangian": total}

    def after_step(self, step: int) -> dict[str, float]:
        logs = super().after_step(step)
        if self.cfg.log_alpha == "clamped":
            for g in self.gates.values():
                g.clamp_()
        logs.update(self._last)
        for gi, towers in enumerate(self.groups):
            logs[f"lambda1/{'+'.join(towers)}"] = float(self.lambdas[gi, 0].detach())
            logs[f"target/{'+'.join(towers)}"] = self.target_sparsity(step, towers)
        return logs

    def check_finite(self) -> str | None:
        # |lambda| > 1e20 is divergence in all but name: the next Adam step overflows float32
        if not torch.isfinite(self.lambdas).all() or self.lambdas.detach().abs().max() > 1e20:
            return f"the Lagrange multipliers diverged (lambda = {self.lambdas.detach().flatten().tolist()})"
        if any(g.diverged() for g in self.gates.values()):
            return "the mask parameters diverged (NaN/inf log-alpha)"
        return None

    # ---------------------------------------------------------------- optimisation
    def optimizers(self, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
        opts = super().optimizers(cfg, device)
        masks = [p for g in self.gates.values() for p in g.parameters()]
        opts.append(
            torch.optim.Adam([{"params": masks, "base_lr": self.cfg.mask_lr, "constant_lr": True}], lr=self.cfg.mask_lr)
        )
        opts.append(
            torch.optim.Adam(
                [{"params": [self.lambdas], "base_lr": self.cfg.lambda_lr, "constant_lr": True}],
                lr=self.cfg.lambda_lr,
                maximize=True,
            )
        )
        return opts

    # ---------------------------------------------------------------- materialise
    def plan(self) -> KeepPlan:
        """What the materialised student keeps: the budget's plan for each gated tower (``budget_plans``);
        ungated towers keep everything."""
        shape = self.model.shape

        def count(tower: str, plan: TowerPlan) -> int:
            return shape.with_tower(tower, plan.shape(shape.tower(tower))).params()[tower]

        gates = dict(self.gates.items())
        floor = ClipShape.from_dict(self.cfg.floor) if self.cfg.floor else None
        floors = {t: floor.tower(t) for t in gates} if floor is not None else None
        budget = {t: self.budget[t] for t in gates}
        c = self.cfg
        plans = budget_plans(gates, count, budget, c.joint, c.layers, floors, c.round_hidden_to_head)
        full = {t: full_tower_plan(shape.tower(t)) for t in TOWERS}  # ungated towers contain any floor
        return KeepPlan(plans.get("image", full["image"]), plans.get("text", full["text"]))

    def deterministic_masks(self, plan: KeepPlan) -> dict[str, TowerMasks | None]:
        """Per tower, the masks under which the full model computes what ``finalize``'s student computes
        (None for a tower without gates)."""
        return {t: deterministic_masks(plan.tower(t), self.gates[t]) if t in self.gates else None for t in TOWERS}

    def finalize(self) -> ClipModel:
        plan = self.plan()
        return slice_model(fold_masks(self.model, self.deterministic_masks(plan)), plan).eval()

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            **super().checkpoint_meta(),
            "prune": asdict(self.cfg),
            "budget": self.budget,
            "mask_steps": self.mask_steps,
            "seed": self.seed,
        }

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], cfg: Any) -> PruneTask:
        model = ClipModel(ClipShape.from_dict(meta["shape"]))
        return cls(model, PruneCfg(**meta["prune"]), meta["budget"], meta["mask_steps"], meta["seed"])
