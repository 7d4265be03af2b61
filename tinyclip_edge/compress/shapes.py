"""Student shapes: derived from a parameter-ratio target, or given explicitly, and checked against the teacher.

Manual students keep the attention width equal to the hidden width (heads x head_dim), so uniform
students convert back to a plain open_clip model. Among all (layers, heads, MLP width) that fit the
budget, the default policy picks the most *balanced* one (depth, width and MLP width shrunk by
similar factors); ``width`` keeps every layer and shrinks widths, ``depth`` keeps the widths and drops layers.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any, Literal

from ..common import typed
from ..common.errors import UserError, closest
from ..common.typed import Range
from ..common.vocab import TOWERS
from ..models.presets import PRESETS, preset_shape
from ..models.shape import ClipShape, TowerShape

RATIO = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]  # a fraction of parameters, in (0, 1)
TowerRatios = dict[Literal["image", "text"], RATIO | None]  # {image: r, text: r}; null keeps a tower

POLICIES = ("balanced", "width", "depth")
MLP_MULTIPLE = 8
# How much shrinking each dimension costs when picking a balanced shape. Removing MLP neurons hurts an
# inherited student far less than removing layers, heads or residual channels (measured on the scenes
# teacher, R@1 before any training: 73% intact; MLP 512->128 62%; 4->2 heads 12%; one layer of four
# dropped 21%; hidden 128->96 28%), so MLP width is cheap -- down to half the hidden width.
SHRINK_COST = {"layers": 1.0, "width": 1.0, "mlp": 0.03}
MIN_MLP_RATIO = 0.5


def check_ratio(ratio: Any, what: str = "target") -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(
            f"{what} must be a number between 0 and 1 (a fraction of the teacher's parameters), got {ratio!r}"
        ) from None
    if not 0.0 < r < 1.0:
        raise UserError(f"{what} must be between 0 and 1 exclusive (a fraction of the teacher's parameters), got {r}")
    return r


def tower_targets(target: Any) -> dict[str, float | None]:
    """A float (both towers) or {image: r, text: r}; None / missing keeps a tower as it is."""
    if isinstance(target, dict):
        unknown = set(target) - set(TOWERS)
        if unknown:
            raise UserError(f"target has unknown towers {sorted(unknown)}; use 'image' and 'text'")
        return {t: None if target.get(t) is None else check_ratio(target[t], f"target.{t}") for t in TOWERS}
    r = check_ratio(target)
    return {t: r for t in TOWERS}


def _tower_params(shape: ClipShape, tower: str, ts: TowerShape) -> int:
    return shape.with_tower(tower, ts).params()[tower]


def _candidate(ts: TowerShape, layers: int, heads: int, mlp: int) -> TowerShape:
    return replace(ts, width=heads * ts.head_dim, heads=[heads] * layers, mlp=[mlp] * layers)


def shape_for_tower(
    shape: ClipShape,
    tower: str,
    ratio: float,
    policy: str = "balanced",
    within: tuple[TowerShape, TowerShape] | None = None,
) -> TowerShape:
    """The uniform tower shape that best uses `ratio` of the tower's parameters under `policy`.

    `within` = (upper, lower) restricts layers, heads and MLP width to lie between two shapes (the chain
    planner's nesting constraint, compress/chain.py); costs are still measured against `shape`.
    """
    if policy not in POLICIES:
        raise UserError(f"unknown shape policy '{policy}'; choose from {', '.join(POLICIES)}")
    ts = shape.tower(tower)
    full = _tower_params(shape, tower, ts)
    budget = ratio * full
    layers0, mlp0 = ts.layers, max(ts.mlp)
    width0 = ts.width
    up, lo = within or (ts, None)
    l_hi, h_hi, m_hi = up.layers, max(up.heads), max(up.mlp)
    l_lo, h_lo, m_lo = (lo.layers, max(lo.heads), max(lo.mlp)) if lo is not None else (1, 1, 0)
    cands: list[tuple[TowerShape, float, float]] = []  # (shape, fraction of budget used, imbalance)
    layer_range = [l_hi] if policy == "width" else range(l_lo, l_hi + 1)
    head_range = [h_hi] if policy == "depth" else range(h_lo, h_hi + 1)
    for n_layers in layer_range:
        for n_heads in head_range:
            # parameters are linear in the MLP width: solve for the largest one that fits the budget
            # (an MLP also brings a LayerNorm and a bias, so measure the slope between two non-zero widths)
            m1, m2 = MLP_MULTIPLE, 2 * MLP_MULTIPLE
            p1 = _tower_params(shape, tower, _candidate(ts, n_layers, n_heads, m1))
            p2 = _tower_params(shape, tower, _candidate(ts, n_layers, n_heads, m2))
            if p1 > budget:
                continue
            mlp = m1 + int((budget - p1) / ((p2 - p1) / (m2 - m1)))
            mlp = min(m_hi, mlp // MLP_MULTIPLE * MLP_MULTIPLE)
            if mlp < m_lo:
                continue
            cand = _candidate(ts, n_layers, n_heads, mlp)
            fr = {"layers": n_layers / layers0, "width": n_heads * ts.head_dim / width0, "mlp": mlp / mlp0}
            cost = sum(SHRINK_COST[k] * math.log(f) ** 2 for k, f in fr.items())
            cands.append((cand, _tower_params(shape, tower, cand) / budget, cost))
    if not cands:
        other = "" if policy == "balanced" else " or use shape_policy: balanced"
        raise UserError(
            f"no {tower} student fits {ratio:.1%} of the teacher's {tower} parameters "
            f"({full:,}) with shape_policy '{policy}'; raise the target{other}"
        )
    # Use (nearly) the whole budget, keep MLPs at least half as wide as the stream, then balance.
    roomy = [c for c in cands if c[0].mlp[0] >= MIN_MLP_RATIO * c[0].width] or cands
    best_fill = max(c[1] for c in roomy)
    return min((c for c in roomy if c[1] >= best_fill - 0.03), key=lambda c: c[2])[0]


def shape_for_ratio(shape: ClipShape, ratio: float | dict[str, float | None], policy: str = "balanced") -> ClipShape:
    """The student shape whose towers each hold at most `ratio` of the teacher tower's parameters."""
    out = shape
    for tower, r in tower_targets(ratio).items():
        if r is not None:
            out = out.with_tower(tower, shape_for_tower(shape, tower, r, policy))
    return out.validate()


def explicit_tower(teacher: ClipShape, tower: str, spec: dict[str, Any]) -> TowerShape:
    """A tower shape from {layers, heads, mlp, width}: ints (uniform) or per-layer lists (keys and values
    already checked by ``explicit_shape``)."""
    ts = teacher.tower(tower)
    heads, mlp = spec.get("heads", max(ts.heads)), spec.get("mlp", max(ts.mlp))
    layers = spec.get("layers", len(heads) if isinstance(heads, list) else ts.layers)
    heads = heads if isinstance(heads, list) else [int(heads)] * int(layers)
    mlp = mlp if isinstance(mlp, list) else [int(mlp)] * int(layers)
    if len(heads) != layers or len(mlp) != layers:
        raise UserError(f"shape.{tower}: per-layer heads/mlp lists must have {layers} entries")
    width = int(spec.get("width", max(heads) * ts.head_dim))
    return replace(ts, width=width, heads=[int(h) for h in heads], mlp=[int(m) for m in mlp])


def check_fits(teacher: ClipShape, student: ClipShape) -> None:
    """A student must be a sub-network of its teacher: never more layers, heads, neurons or channels."""
    for tower in TOWERS:
        t, s = teacher.tower(tower), student.tower(tower)
        problems = []
        if s.layers > t.layers:
            problems.append(f"{s.layers} layers > {t.layers}")
        if s.width > t.width:
            problems.append(f"width {s.width} > {t.width}")
        if max(s.heads, default=0) > max(t.heads, default=0):
            problems.append(f"{max(s.heads)} heads > {max(t.heads)}")
        if max(s.mlp, default=0) > max(t.mlp, default=0):
            problems.append(f"MLP width {max(s.mlp)} > {max(t.mlp)}")
        if s.head_dim != t.head_dim:
            problems.append(f"head_dim {s.head_dim} != {t.head_dim}")
        if problems:
            raise UserError(
                f"the {tower} student is larger than its teacher ({'; '.join(problems)}); "
                "a student inherits a subset of the teacher's weights, so shrink the shape or the target"
            )


TOWER_KEYS = ("layers", "heads", "mlp", "width")


def explicit_shape(shape: Any, source: ClipShape | None, path: str) -> ClipShape | None:
    """The one reader of an explicit stage shape: a preset name, a full shape (with embed_dim), or per-tower
    {layers, heads, mlp, width} (positive integers or per-layer lists) over `source`'s towers. Every form is
    checked without a model (a recipe is validated before any teacher loads): with `source` None the shape
    is only checked and None returned."""
    if isinstance(shape, str):
        if shape not in PRESETS:
            raise UserError(
                f"{path}: unknown model preset {shape!r}{closest(shape, PRESETS)}; presets: {', '.join(PRESETS)}"
            )
        return preset_shape(shape) if source is not None else None
    if "embed_dim" in shape:
        try:
            return ClipShape.from_dict(shape)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path} is not a valid model shape ({e})") from None
    for tower, spec in shape.items():
        _check_tower_spec(tower, spec, path)
    if source is None:
        return None
    out = source
    for tower, spec in shape.items():
        out = out.with_tower(tower, explicit_tower(source, tower, spec or {}))
    return out.validate()


def check_shape(shape: Any, path: str) -> None:
    """An explicit stage shape, checked without a teacher (``explicit_shape`` with no source)."""
    explicit_shape(shape, None, path)


def _check_tower_spec(tower: Any, spec: Any, path: str) -> None:
    if tower not in TOWERS:
        raise UserError(
            f"{path} has unknown tower {tower!r}; use image and text, a full shape, or a preset "
            f"name ({', '.join(PRESETS)})"
        )
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise UserError(f"{path}.{tower} must be a mapping of layers, heads, mlp, width, got {spec!r}")
    for key, value in spec.items():
        if key not in TOWER_KEYS:
            raise UserError(
                f"{path}.{tower} has unknown key {key!r}{closest(str(key), TOWER_KEYS)}; "
                "allowed: layers, heads, mlp, width"
            )
        lo = 0 if key in ("heads", "mlp") else 1  # a layer may drop its attention or MLP entirely
        tp = Annotated[int, Range(lo, 1_000_000)]
        typed.check_value(
            value, tp | list[tp] if key in ("heads", "mlp") else tp, f"{path}.{tower}.{key}", "recipe key"
        )
