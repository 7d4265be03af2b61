"""Property-based test of the recipe loader: random types and values at every field of the Recipe tree.

Whatever is thrown at it, loading a recipe either raises UserError (one line for the CLI) or returns a recipe
whose every value lies in the domain its field's type documents (Literal choices, Range bounds, Pattern).
The domain check below is written independently of common/typed.py, so it can catch that validator's bugs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.typed import Pattern, Range
from tinyclip_edge.compress.recipe import Recipe, StageCfg, load_recipe

BASE = {
    "name": "prop",
    "teacher": "builtin:scenes-teacher",
    "device": "cpu",
    "stages": [
        {"name": "s1", "steps": 10, "method": "prune", "prune": {"target": 0.5}},
        {"name": "s2", "steps": 10, "target": {"image": 0.3, "text": 0.4}},
    ],
    "export": {"precisions": ["fp32", "int8"]},
    "bench": {"precisions": ["fp32"]},
}


# ----------------------------------------------------------------------------- walking the schema
def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def leaf_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, type) of every non-dataclass field, descending into nested and optional sections and into
    the first element of list-of-dataclass fields (stages.0...)."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.append((path, tp))  # the section itself gets random values too
            out += leaf_fields(inner, path + ".")
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            out.append((path, tp))
            out += leaf_fields(typing.get_args(inner)[0], path + ".0.")
        else:
            out.append((path, tp))
    return out


FIELDS = leaf_fields()


def type_at(path: str) -> Any:
    return dict(FIELDS)[path]


# ----------------------------------------------------------------------------- an independent domain check
def in_domain(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if not in_domain(value, base):
            return False
        for m in meta:
            if isinstance(m, Range):
                if m.lo is not None and (value < m.lo or (m.lo_open and value == m.lo)):
                    return False
                if m.hi is not None and (value > m.hi or (m.hi_open and value == m.hi)):
                    return False
            if isinstance(m, Pattern) and not re.fullmatch(m.regex, value):
                return False
        return True
    if origin is typing.Literal:
        return not isinstance(value, bool) and value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(in_domain(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(in_domain(v, item) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(in_domain(k, kt) and in_domain(v, vt) for k, v in value.items())
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp) and all(
            in_domain(getattr(value, f.name), t)
            for f, t in zip(dataclasses.fields(tp), typing.get_type_hints(tp, include_extras=True).values())
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    return True  # Any


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = data
    for part in parts[:-1]:
        if part.isdigit():
            if not isinstance(node, list) or len(node) <= int(part) or not isinstance(node[int(part)], dict):
                return  # an earlier change replaced this list wholesale
            node = node[int(part)]
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- values to throw
def near_domain(tp: Any) -> st.SearchStrategy:
    """Values at and just outside the documented domain: Literal choices and their typos, Range bounds."""
    found: list[Any] = []

    def walk(t: Any) -> None:
        origin = typing.get_origin(t)
        if origin is typing.Literal:
            for c in typing.get_args(t):
                found.extend([c, f"{c}x", str(c).upper()])
        elif origin is typing.Annotated:
            base, *meta = typing.get_args(t)
            for m in meta:
                if isinstance(m, Range):
                    for b in (m.lo, m.hi):
                        if b is not None:
                            found.extend([b, b - 1, b + 1, b - 0.5, b + 0.5, b - 1e-9, b + 1e-9])
                if isinstance(m, Pattern):
                    found.extend(["ok_name-1", ".", "..", "../x", "-x", "a/b", "", "x" * 101, "a.masks"])
            walk(base)
        elif origin in (Union, types.UnionType, list, dict):
            for a in typing.get_args(t):
                walk(a)

    walk(tp)
    return st.sampled_from(found) if found else st.nothing()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "scenes:val:-5",
            "scenes:val:0",
            "scenes:train",
            "scenes:x",
            "cuda",
            "cpu",
            "auto",
            "cuda:99",
            "teacher",
            "clip",
            "affinity",
            "1e-4",
            "nan",
            "-1",
            "0",
        ]
    ),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(
                    ["image", "text", "weight", "affinity", "clip", "embed_dim", "layers", "heads", "mlp", "width"]
                ),
            ),
            children,
            max_size=3,
        ),
    ),
    max_leaves=6,
)


@st.composite
def mutations(draw) -> list[tuple[str, Any]]:
    picked = draw(st.lists(st.sampled_from([p for p, _ in FIELDS]), min_size=1, max_size=3, unique=True))
    return [(p, draw(st.one_of(near_domain(type_at(p)), anything))) for p in picked]


def check_loaded(recipe: Recipe) -> None:
    """Every field of the loaded recipe lies in its documented domain, and the cross-field rules hold."""
    for path, tp in FIELDS:
        try:
            value = get_path(recipe, path)
        except (AttributeError, IndexError, TypeError):
            continue  # an optional section that is None, or a recipe with fewer stages
        assert in_domain(value, tp), f"{path}={value!r} accepted outside {tp}"
    names = [s.name.lower() for s in recipe.stages]
    assert len(set(names)) == len(names) and not {"teacher", "checkpoints", "baselines"} & set(names)
    for s in recipe.stages:
        assert s.warmup < 1 or (float(s.warmup).is_integer() and s.warmup < s.steps)
        assert s.batch_size % s.grad_accum == 0 and s.min_lr <= s.lr
        for spec in s.losses.values():
            w = spec.get("weight", 1.0) if isinstance(spec, dict) else spec
            assert not isinstance(w, bool) and math.isfinite(float(w)) and float(w) >= 0
    if recipe.bench is not None:
        assert recipe.export is not None
        assert set(recipe.bench.precisions or ()) <= set(recipe.export.precisions)


def test_the_walk_covers_every_section():
    paths = {p for p, _ in FIELDS}
    for p in (
        "stages.0.prune.mask_steps",
        "stages.0.name",
        "export.on_parity_failure",
        "export.calib_method",
        "bench.seconds",
        "bench.power_interval_ms",
        "eval.batch_size",
        "data.workers",
        "device",
    ):
        assert p in paths
    assert len(paths) > 80
    check_loaded(load_recipe(copy.deepcopy(BASE)))  # the base recipe is valid (positive control)


def test_the_domain_check_catches_values_outside():
    """The oracle itself can fail: a value outside the domain, set behind the validator's back, is caught."""
    recipe = load_recipe(copy.deepcopy(BASE))
    recipe.stages[0].prune.mask_steps = 1.5
    with pytest.raises(AssertionError, match="mask_steps"):
        check_loaded(recipe)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations())
def test_random_values_give_a_user_error_or_a_recipe_in_its_domain(changes):
    data = copy.deepcopy(BASE)
    for path, value in changes:
        set_path(data, path, value)
    try:
        recipe = load_recipe(data)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    check_loaded(recipe)


override_keys = st.one_of(st.sampled_from([p for p, _ in FIELDS]), st.text(max_size=15))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(override_keys, st.text(max_size=20)), min_size=1, max_size=3))
def test_random_overrides_give_a_user_error_or_a_recipe_in_its_domain(items):
    overrides = [f"{k}={v}" for k, v in items]
    try:
        recipe = load_recipe(copy.deepcopy(BASE), overrides)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    check_loaded(recipe)


def test_stage_fields_are_all_walked():
    walked = {p.split(".")[2] for p, _ in FIELDS if p.startswith("stages.0.")}
    assert {f.name for f in dataclasses.fields(StageCfg)} <= walked
