"""The loss registry and the embeddings every loss reads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..common.errors import UserError, closest


@dataclass
class DistillOutputs:
    """What one training step computed. Embeddings are L2-normalised, [B, E].

    ``student_image_proj`` / ``student_text_proj`` are the student's embeddings mapped to the teacher's
    width by the objective's learned projection (and renormalised); None when the widths agree. Losses
    that compare student and teacher vectors directly read them through ``s_image_t`` / ``s_text_t``.
    ``learned`` holds the objective's learnable scalars by ``"<loss>.<name>"`` (see ``Learned``).
    """

    student_image: Tensor
    student_text: Tensor
    student_logit_scale: Tensor  # exp'd, scalar
    teacher_image: Tensor | None = None  # None when a stage trains without a teacher
    teacher_text: Tensor | None = None
    teacher_logit_scale: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. region features for later objectives
    student_image_proj: Tensor | None = None
    student_text_proj: Tensor | None = None
    learned: dict[str, Tensor] = field(default_factory=dict)

    def require_teacher(self, loss: str) -> None:
        if self.teacher_image is None:
            raise UserError(f"loss '{loss}' needs a teacher, but this stage has none (teacher: none)")

    @property
    def s_image_t(self) -> Tensor:
        """The student's image embeddings in the teacher's space (projected when the widths differ)."""
        return self.student_image if self.student_image_proj is None else self.student_image_proj

    @property
    def s_text_t(self) -> Tensor:
        return self.student_text if self.student_text_proj is None else self.student_text_proj

    def teacher(self, loss: str) -> tuple[Tensor, Tensor]:
        """The teacher's embeddings as float32 constants: no gradient can reach the teacher through a loss."""
        self.require_teacher(loss)
        assert self.teacher_image is not None and self.teacher_text is not None
        return self.teacher_image.detach().float(), self.teacher_text.detach().float()

    def scale(self, loss: str, name: str) -> Tensor:
        """A learnable scalar of `loss` (its value, e.g. exp(log kappa)); the initial value when the loss runs
        outside an Objective (direct calls in tests and scripts)."""
        key = f"{loss}.{name}"
        if key in self.learned:
            return self.learned[key]
        spec = REGISTRY[loss].learned[name]
        return torch.tensor(spec.value(spec.init), device=self.student_image.device)


@dataclass(frozen=True)
class Learned:
    """A learnable scalar a loss needs. ``init`` is the parameter's initial value; with ``exp`` the scale
    is exp(parameter) (a log-parameterised temperature, like CLIP's), otherwise the parameter itself (a
    plain multiplier). Values are clamped to [0, ``max``] after every step so logits cannot blow up."""

    init: float = math.log(1 / 0.07)
    exp: bool = False
    max: float = 100.0

    def value(self, p: Tensor | float) -> Tensor | float:
        if self.exp:
            return p.exp() if isinstance(p, Tensor) else math.exp(p)
        return p


LossFn = Callable[[DistillOutputs, dict[str, Any]], dict[str, Tensor]]


@dataclass(frozen=True)
class LossEntry:
    """A registered loss and everything the rest of the code asks about it."""

    fn: LossFn
    options: frozenset[str]  # recipe keys it accepts ("weight" included)
    learned: dict[str, Learned]  # its learnable scalars (owned by the stage's Objective)
    cross_model: bool  # compares student with teacher vectors: needs the width projection
    needs_teacher: bool  # False: a stage with teacher: none (and a scratch baseline) may train with it
    check: Callable[[dict[str, Any]], None] | None  # validates its options' values


REGISTRY: dict[str, LossEntry] = {}


def register_loss(
    name: str,
    options: tuple[str, ...] = (),
    learned: dict[str, Learned] | None = None,
    cross_model: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
    needs_teacher: bool = True,
) -> Callable[[LossFn], LossFn]:
    """Register a loss; `options` are the keys it accepts from the recipe, `check(options)` validates their
    values (raising UserError); both run when the recipe is read, before any training. `learned` are its
    learnable scalars (owned by the stage's Objective), `cross_model` whether it compares student vectors
    with teacher vectors (then a student->teacher width projection is learned when widths differ),
    `needs_teacher` whether it reads the teacher's embeddings at all."""

    def deco(fn: LossFn) -> LossFn:
        REGISTRY[name] = LossEntry(
            fn, frozenset({"weight", *options}), dict(learned or {}), cross_model, needs_teacher, check
        )
        return fn

    return deco


def teacher_free_losses() -> tuple[str, ...]:
    """The losses a stage without a teacher may use, as their registrations declare."""
    return tuple(name for name, entry in REGISTRY.items() if not entry.needs_teacher)


def loss_entry(name: str) -> LossEntry:
    if name not in REGISTRY:
        raise UserError(
            f"unknown loss '{name}'{closest(str(name), REGISTRY)}; registered: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def get_loss(name: str) -> LossFn:
    return loss_entry(name).fn


@dataclass
class LossSpec:
    name: str
    weight: float
    options: dict[str, Any]


def check_weight(value: Any, name: str) -> float:
    """A loss weight: a finite number >= 0 (0 switches the loss off; a negative weight would maximise it)."""
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"losses.{name}: the weight must be a finite number >= 0, got {value!r}")
    return weight


def parse_losses(cfg: dict[str, Any]) -> list[LossSpec]:
    """Recipe form: ``{affinity: 1.0, clip: {weight: 0.5, ...}}``; unknown names and options, negative,
    NaN or infinite weights are errors."""
    if not isinstance(cfg, dict) or not cfg:
        raise UserError("losses must be a mapping of loss name to weight, e.g. {affinity: 1.0}")
    specs = []
    for name, v in cfg.items():
        entry = loss_entry(str(name))
        opts = dict(v) if isinstance(v, dict) else {"weight": v}
        unknown = set(opts) - entry.options
        if unknown:
            bad = min(str(k) for k in unknown)
            raise UserError(
                f"losses.{name} has no option '{bad}'{closest(bad, entry.options)}; "
                f"options: {', '.join(sorted(entry.options))}"
            )
        weight = check_weight(opts.pop("weight", 1.0), name)
        if entry.check is not None:
            entry.check(opts)
        specs.append(LossSpec(name, weight, opts))
    if not any(s.weight > 0 for s in specs):
        raise UserError("every loss weight is 0: nothing would be trained; give at least one loss a weight > 0")
    return specs


def combine(specs: list[LossSpec], out: DistillOutputs) -> tuple[Tensor, dict[str, float]]:
    """The weighted total and every named term (as floats, for logging)."""
    total: Tensor | None = None
    logs: dict[str, float] = {}
    for spec in specs:
        if spec.weight == 0:
            continue
        terms = REGISTRY[spec.name].fn(out, spec.options)
        for term, value in terms.items():
            logs[f"{spec.name}/{term}" if term != spec.name else spec.name] = float(value.detach())
        part = sum(terms.values()) * spec.weight
        total = part if total is None else total + part
    if total is None:
        total = torch.zeros((), device=out.student_image.device, requires_grad=True)
    logs["total"] = float(total.detach())
    return total, logs
