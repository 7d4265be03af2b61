"""``ParityReport``: what parity measured, the checks with their thresholds, JSON and markdown forms."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..common.embeddings import PairedDelta


@dataclass
class Tolerance:
    """What parity demands of an artifact; every field has a domain (``check_domains``)."""

    min_cosine: float  # per tower, every row, in [-1, 1]
    min_agreement: float | None = None  # top-1 agreement with PyTorch on confident queries, a fraction in [0, 1]
    max_abs: float | None = None  # per tower, largest absolute difference, >= 0
    # Task checks: an artifact fails when its R@1 or zero-shot top-1 is significantly below the reference's
    # (the paired interval's upper end < 0) AND the drop is larger than this many points (0..100).
    max_task_drop: float | None = None
    # Agreement counts only queries whose reference top-1 beats its runner-up by more than this (cosine units,
    # in [0, 2]); closer ones are near-ties that tiny numeric differences flip, for better or worse.
    agreement_margin: float = 0.01
    confidence: float = 0.95  # of the task intervals (two-sided), in (0, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_domains(self) -> None:
        """One clear error per value outside its domain (e.g. --min-cosine 7, or agreement given in percent)."""
        from ..common.errors import UserError

        if not -1.0 <= self.min_cosine <= 1.0:
            raise UserError(f"--min-cosine must be a cosine similarity in [-1, 1], got {self.min_cosine:g}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            pct = 1 < self.min_agreement <= 100
            hint = f" (write {self.min_agreement / 100:g} for {self.min_agreement:g}%)" if pct else ""
            raise UserError(f"--min-agreement must be a fraction in [0, 1]{hint}, got {self.min_agreement:g}")
        if self.max_abs is not None and not self.max_abs >= 0:
            raise UserError(f"--max-abs must be >= 0, got {self.max_abs:g}")
        if self.max_task_drop is not None and not 0.0 <= self.max_task_drop <= 100.0:
            raise UserError(f"--max-task-drop is in accuracy points, from 0 to 100, got {self.max_task_drop:g}")
        if not 0.0 <= self.agreement_margin <= 2.0:
            raise UserError(f"--agreement-margin is a cosine-similarity gap in [0, 2], got {self.agreement_margin:g}")
        if not 0.0 < self.confidence < 1.0:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence:g}")


# Embedding checks for every precision; task checks (points of R@1 / zero-shot top-1 that may be lost, and only
# when the loss is significant) and confident-query agreement for the lossy ones. The numbers and why:
# docs/EXPORT.md, "Parity".
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(0.9999, max_task_drop=0.5),
    "fp16": Tolerance(0.999, max_task_drop=1.0),
    "int8": Tolerance(0.99, 0.97, max_task_drop=2.0),
    "int8-dynamic": Tolerance(0.99, 0.97, max_task_drop=2.0),
}
BATCH_INVARIANT_MAX_ABS = 1e-5  # embeddings at batch 1 and batch N closer than this count as batch-invariant


@dataclass
class Check:
    artifact: str
    scope: str  # "image" | "text" | "retrieval" | "zero-shot"
    metric: str  # "min_cosine" | "max_abs" | "confident_top1_agreement" | "delta_points"
    value: float
    threshold: float
    passed: bool
    interval: list[float] | None = None  # delta_points: the paired interval of the change, in points

    @classmethod
    def at_least(cls, artifact: str, scope: str, metric: str, value: float, threshold: float) -> Check:
        return cls(artifact, scope, metric, value, threshold, bool(value >= threshold))

    @classmethod
    def at_most(cls, artifact: str, scope: str, metric: str, value: float, threshold: float) -> Check:
        return cls(artifact, scope, metric, value, threshold, bool(value <= threshold))

    @classmethod
    def task_drop(cls, artifact: str, scope: str, delta: PairedDelta, max_drop: float) -> Check:
        """Fails only when the change is significantly negative (interval entirely below 0) AND below -max_drop."""
        pts = [100 * delta.delta, 100 * delta.low, 100 * delta.high]
        failed = pts[2] < 0 and pts[0] < -max_drop
        return cls(artifact, scope, "delta_points", pts[0], -max_drop, not failed, pts[1:])


@dataclass
class TaskScores:
    """Task-level numbers of one model on the parity data (None when not measurable)."""

    retrieval_r1: float | None = None
    retrieval_agreement: float | None = None  # raw: with the PyTorch reference (or, for the teacher, the student)
    zero_shot_top1: float | None = None
    zero_shot_agreement: float | None = None
    # median similarity margin, in the reference's own scores, between its top-1 caption and the one this model
    # picked instead (disagreements only): tiny values mean the disagreements are near-ties
    retrieval_disagreement_margin: float | None = None
    # agreement over the queries whose reference top-1 margin exceeds Tolerance.agreement_margin, and how many
    retrieval_agreement_confident: float | None = None
    retrieval_confident_queries: int | None = None
    zero_shot_agreement_confident: float | None = None
    zero_shot_confident_queries: int | None = None
    # change against the reference in points (artifact - reference) with its paired interval [low, high]
    retrieval_r1_delta: float | None = None
    retrieval_r1_delta_interval: list[float] | None = None
    zero_shot_top1_delta: float | None = None
    zero_shot_top1_delta_interval: list[float] | None = None


@dataclass
class ArtifactResult:
    name: str  # e.g. "onnxrt" or "trt"
    backend: str
    precision: str
    towers: dict[str, dict[str, float]]  # tower -> max_abs / mean_abs / min_cosine / mean_cosine
    tasks: TaskScores = field(default_factory=TaskScores)
    provider: str | None = None  # ONNX Runtime execution provider that ran it
    # tower -> max abs difference between each input's embedding computed alone (batch 1) and in a batch
    batch_invariance: dict[str, float] = field(default_factory=dict)
    batch_invariance_batch: int | None = None  # the batch size N of that comparison

    @property
    def batch_invariant(self) -> bool | None:
        if not self.batch_invariance:
            return None
        return all(v <= BATCH_INVARIANT_MAX_ABS for v in self.batch_invariance.values())


@dataclass
class ParityReport:
    bundle: str
    precision: str
    reference: str
    data: str  # the data spec, or "random" (fallback without data)
    samples: int
    normalized: bool
    tolerance: Tolerance
    reference_tasks: TaskScores
    artifacts: list[ArtifactResult]
    checks: list[Check]
    teacher: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # captions, distinct captions, distinct token sequences of the parity data (None for random inputs)
    data_quality: dict[str, int] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for a, obj in zip(d["artifacts"], self.artifacts):
            a["batch_invariant"] = obj.batch_invariant
        d["passed"] = self.passed
        return _finite(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"# Parity: {self.bundle} ({self.precision}) - {verdict}",
            "",
            f"reference: {self.reference} (PyTorch fp32) | data: {self.data} ({self.samples} pairs) | "
            f"normalized: {self.normalized}"
            + "".join(f" | {a.name} on {a.provider}" for a in self.artifacts if a.provider),
            "",
            "| artifact | tower | max abs | mean abs | min cosine | mean cosine |",
            "|---|---|---|---|---|---|",
        ]
        for a in self.artifacts:
            for tower, d in a.towers.items():
                lines.append(
                    f"| {a.name} {a.precision} | {tower} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | "
                    f"{d['min_cosine']:.6f} | {d['mean_cosine']:.6f} |"
                )
        eps = self.tolerance.agreement_margin
        lines += [
            "",
            f"| model | R@1 image->text | ΔR@1 (points, {self.tolerance.confidence:.0%} interval) | "
            f"top-1 agreement (raw / margin > {eps:g}) | zero-shot top-1 | Δ zero-shot (points) | "
            "zero-shot agreement (raw / margin) | margin of disagreements |",
            "|---|---|---|---|---|---|---|---|",
            _task_row("PyTorch reference", self.reference_tasks),
        ]
        lines += [_task_row(f"{a.name} {a.precision}", a.tasks) for a in self.artifacts]
        inv = [a for a in self.artifacts if a.batch_invariance]
        if inv:
            lines += [
                "",
                "| artifact | batch invariance: max abs, batch 1 vs batch N | batch-invariant |",
                "|---|---|---|",
            ]
            lines += [
                f"| {a.name} {a.precision} | "
                + ", ".join(f"{t} {v:.3g}" for t, v in a.batch_invariance.items())
                + f" (N={a.batch_invariance_batch}) | {'yes' if a.batch_invariant else 'NO'} |"
                for a in inv
            ]
        if self.teacher:
            lines += ["", _teacher_section(self.teacher)]
        lines += ["", "| artifact | scope | check | value | threshold | result |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            lines.append(
                f"| {c.artifact} | {c.scope} | {c.metric} | {_check_value(c)} | {_check_rule(c)} | "
                f"{'pass' if c.passed else 'FAIL'} |"
            )
        for s in self.skipped:
            lines.append(f"\nskipped {s['artifact']}: {s['reason']}")
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _delta(x: float | None, interval: list[float] | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.1f}" + (f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "")


def _agree(raw: float | None, confident: float | None, n: int | None) -> str:
    if raw is None:
        return "-"
    return f"{_pct(raw)} / {_pct(confident)}" + (f" (n={n})" if n is not None else "")


def _task_row(name: str, t: TaskScores, margin: bool = True) -> str:
    if not margin:  # the teacher's view: plain agreement
        return (
            f"| {name} | {_pct(t.retrieval_r1)} | {_pct(t.retrieval_agreement)} | {_pct(t.zero_shot_top1)} | "
            f"{_pct(t.zero_shot_agreement)} |"
        )
    gap = "-" if t.retrieval_disagreement_margin is None else f"{t.retrieval_disagreement_margin:.2g}"
    return (
        f"| {name} | {_pct(t.retrieval_r1)} | {_delta(t.retrieval_r1_delta, t.retrieval_r1_delta_interval)} | "
        f"{_agree(t.retrieval_agreement, t.retrieval_agreement_confident, t.retrieval_confident_queries)} | "
        f"{_pct(t.zero_shot_top1)} | {_delta(t.zero_shot_top1_delta, t.zero_shot_top1_delta_interval)} | "
        f"{_agree(t.zero_shot_agreement, t.zero_shot_agreement_confident, t.zero_shot_confident_queries)} | "
        f"{gap} |"
    )


def _check_value(c: Check) -> str:
    if c.metric == "delta_points":
        return _delta(c.value, c.interval)
    return f"{c.value:.6g}"


def _check_rule(c: Check) -> str:
    if c.metric == "delta_points":
        return f"fails if interval < 0 and Δ < {c.threshold:.3g}"
    return f"{'<=' if c.metric == 'max_abs' else '>='} {c.threshold:.6g}"


def _teacher_section(t: dict[str, Any]) -> str:
    cos = t.get("cosine")
    cos_text = (
        "; ".join(f"{k} mean cosine {v['mean_cosine']:.4f} (min {v['min_cosine']:.4f})" for k, v in cos.items())
        if cos
        else f"embedding cosine not comparable ({t.get('cosine_note', 'dims differ')})"
    )
    tasks = TaskScores(**t["tasks"])
    return (
        "## Compression view: student (PyTorch reference) vs teacher\n\n"
        f"teacher: {t['spec']} | {cos_text}\n\n"
        "| model | R@1 image->text | top-1 agreement with student | zero-shot top-1 | zero-shot agreement |\n"
        "|---|---|---|---|---|\n" + _task_row("teacher", tasks, margin=False)
    )


def _finite(obj: Any) -> Any:
    """NaN is not JSON; report it as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
