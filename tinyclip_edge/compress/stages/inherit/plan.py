"""Manual weight inheritance: a smaller student starts from the most important parts of its teacher.

Layers are evenly spaced (TinyCLIP's default: keeps the first and the last) or chosen by importance;
in every kept layer the top heads and MLP neurons by importance are kept, and one set of residual
channels is kept for the whole tower (the residual stream must stay consistent across layers).
Kept units stay in their original order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ....common.errors import UserError
from ....common.vocab import TOWERS
from ....models.clip import ClipModel
from ....models.shape import ClipShape, TowerShape
from ...shapes import check_fits
from ...slicing import KeepPlan, TowerPlan, full_plan, full_tower_plan, slice_model
from .importance import TowerScores, compute_scores

LAYER_SELECTIONS = ("even", "importance")


def _top(scores: Tensor, k: int) -> list[int]:
    if k >= len(scores):
        return list(range(len(scores)))
    return sorted(torch.topk(scores.float().cpu(), k).indices.tolist())


def select_layers(n_src: int, n_dst: int, layer_scores: Tensor, mode: str) -> list[int]:
    if mode not in LAYER_SELECTIONS:
        raise UserError(f"unknown layer selection '{mode}'; choose from {', '.join(LAYER_SELECTIONS)}")
    if n_dst >= n_src:
        return list(range(n_src))
    if mode == "importance":
        return _top(layer_scores, n_dst)
    if n_dst == 1:
        return [n_src - 1]
    return [round(i * (n_src - 1) / (n_dst - 1)) for i in range(n_dst)]


def tower_plan(src: TowerShape, dst: TowerShape, scores: TowerScores, layer_selection: str) -> TowerPlan:
    if dst == src:
        return full_tower_plan(src)
    layers = select_layers(src.layers, dst.layers, scores.layers, layer_selection)
    heads = [_top(scores.heads[li], min(dst.heads[i], src.heads[li])) for i, li in enumerate(layers)]
    mlp = [_top(scores.mlp[li], min(dst.mlp[i], src.mlp[li])) for i, li in enumerate(layers)]
    return TowerPlan(layers, _top(scores.hidden, dst.width), heads, mlp)


def manual_inherit(
    source: ClipModel,
    target: ClipShape,
    *,
    importance: str = "magnitude",
    layer_selection: str = "even",
    calib: Iterable[dict[str, Tensor]] | None = None,
) -> tuple[ClipModel, KeepPlan]:
    """Cut `target` out of `source`; returns the student and the plan (which units it kept)."""
    check_fits(source.shape, target)
    if target == source.shape:
        plan = full_plan(source.shape)
    else:
        scores = compute_scores(source, importance, calib)
        plan = KeepPlan(
            *(tower_plan(source.shape.tower(t), target.tower(t), scores[t], layer_selection) for t in TOWERS)
        )
    return slice_model(source, plan), plan
