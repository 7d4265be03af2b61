"""``ParityReport``: what parity measured, the checks with their thresholds, JSON and markdown forms."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Tolerance:
    min_cosine: float                    # per tower, every row
    min_agreement: float | None = None   # top-1 agreement with PyTorch (retrieval and zero-shot)
    max_abs: float | None = None         # per tower, largest absolute difference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# fp32 and fp16 check embeddings only; int8 also checks that the task-level decisions survive.
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(0.9999),
    "fp16": Tolerance(0.999),
    "int8": Tolerance(0.99, 0.97),
    "int8-dynamic": Tolerance(0.99, 0.97),
}


@dataclass
class Check:
    artifact: str
    scope: str          # "image" | "text" | "retrieval" | "zero-shot"
    metric: str         # "min_cosine" | "max_abs" | "top1_agreement"
    value: float
    threshold: float
    passed: bool

    @classmethod
    def at_least(cls, artifact: str, scope: str, metric: str, value: float, threshold: float) -> "Check":
        return cls(artifact, scope, metric, value, threshold, bool(value >= threshold))

    @classmethod
    def at_most(cls, artifact: str, scope: str, metric: str, value: float, threshold: float) -> "Check":
        return cls(artifact, scope, metric, value, threshold, bool(value <= threshold))


@dataclass
class TaskScores:
    """Task-level numbers of one model on the parity data (None when not measurable)."""

    retrieval_r1: float | None = None
    retrieval_agreement: float | None = None     # with the PyTorch reference (or, for the teacher, the student)
    zero_shot_top1: float | None = None
    zero_shot_agreement: float | None = None
    # median similarity margin, in the reference's own scores, between its top-1 caption and the one this model
    # picked instead (disagreements only): tiny values mean the disagreements are near-ties
    retrieval_disagreement_margin: float | None = None


@dataclass
class ArtifactResult:
    name: str                                    # e.g. "onnxrt" or "trt"
    backend: str
    precision: str
    towers: dict[str, dict[str, float]]          # tower -> max_abs / mean_abs / min_cosine / mean_cosine
    tasks: TaskScores = field(default_factory=TaskScores)


@dataclass
class ParityReport:
    bundle: str
    precision: str
    reference: str
    data: str                                    # the data spec, or "random" (fallback without data)
    samples: int
    normalized: bool
    tolerance: Tolerance
    reference_tasks: TaskScores
    artifacts: list[ArtifactResult]
    checks: list[Check]
    teacher: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return _finite(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"# Parity: {self.bundle} ({self.precision}) - {verdict}", "",
                 f"reference: {self.reference} (PyTorch fp32) | data: {self.data} ({self.samples} pairs) | "
                 f"normalized: {self.normalized}", "",
                 "| artifact | tower | max abs | mean abs | min cosine | mean cosine |", "|---|---|---|---|---|---|"]
        for a in self.artifacts:
            for tower, d in a.towers.items():
                lines.append(f"| {a.name} {a.precision} | {tower} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | "
                             f"{d['min_cosine']:.6f} | {d['mean_cosine']:.6f} |")
        lines += ["", "| model | R@1 image->text | top-1 agreement | zero-shot top-1 | zero-shot agreement | "
                  "margin of disagreements |", "|---|---|---|---|---|---|", _task_row("PyTorch reference", self.reference_tasks)]
        lines += [_task_row(f"{a.name} {a.precision}", a.tasks) for a in self.artifacts]
        if self.teacher:
            lines += ["", _teacher_section(self.teacher)]
        lines += ["", "| artifact | scope | check | value | threshold | result |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            op = ">=" if c.metric != "max_abs" else "<="
            lines.append(f"| {c.artifact} | {c.scope} | {c.metric} | {c.value:.6g} | {op} {c.threshold:.6g} | "
                         f"{'pass' if c.passed else 'FAIL'} |")
        for s in self.skipped:
            lines.append(f"\nskipped {s['artifact']}: {s['reason']}")
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _task_row(name: str, t: TaskScores, margin: bool = True) -> str:
    gap = "" if not margin else (" - |" if t.retrieval_disagreement_margin is None
                                 else f" {t.retrieval_disagreement_margin:.2g} |")
    return (f"| {name} | {_pct(t.retrieval_r1)} | {_pct(t.retrieval_agreement)} | {_pct(t.zero_shot_top1)} | "
            f"{_pct(t.zero_shot_agreement)} |" + gap)


def _teacher_section(t: dict[str, Any]) -> str:
    cos = t.get("cosine")
    cos_text = ("; ".join(f"{k} mean cosine {v['mean_cosine']:.4f} (min {v['min_cosine']:.4f})" for k, v in cos.items())
                if cos else f"embedding cosine not comparable ({t.get('cosine_note', 'dims differ')})")
    tasks = TaskScores(**t["tasks"])
    return ("## Compression view: student (PyTorch reference) vs teacher\n\n"
            f"teacher: {t['spec']} | {cos_text}\n\n"
            "| model | R@1 image->text | top-1 agreement with student | zero-shot top-1 | zero-shot agreement |\n"
            "|---|---|---|---|---|\n" + _task_row("teacher", tasks, margin=False))


def _finite(obj: Any) -> Any:
    """NaN is not JSON; report it as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
