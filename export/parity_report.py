"""``ParityReport``: what parity measured, the checks with their thresholds, JSON and markdown forms.

The report is a versioned file (``parity.json``, format ``tinyclip-edge/parity``): every field below is typed
and ranged, ``ParityReport.read`` validates a file against them and checks that each verdict (a check's
``passed``, the report's ``passed``, an artifact's ``batch_invariant``) follows from the numbers it is
derived from. A report that says PASS over a failing number was edited or is corrupt, and is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from ..common.errors import UserError
from ..common.formats.base import Count, VersionedFile, in_file
from ..common.formats.bundle import PARITY_NAME, is_bundle, record_in_bundle
from ..common.io import atomic_write_text, prepare_out_dir, read_json
from ..common.options import AGREEMENT_MARGIN, PARITY_TOLERANCES
from ..common.typed import Range
from ..common.vocab import TOWERS, Tower
from ..common.vocab import ExportPrecision as Precision
from ..runtimes.host import HostInfo

if TYPE_CHECKING:
    from ..common.embeddings import PairedDelta

PARITY_FORMAT, PARITY_VERSION = "tinyclip-edge/parity", 2  # 2: + host

Fraction = Annotated[float, Range(0.0, 1.0)]
Points = Annotated[float, Range(-100.0, 100.0)]
NonNegative = Annotated[float, Range(0.0, None)]


@dataclass
class Tolerance:
    """What parity demands of an artifact; every field has a domain (values given by a user are checked as
    ParityOptions, with their messages)."""

    min_cosine: Annotated[float, Range(-1.0, 1.0)]  # per tower, every row
    min_agreement: Fraction | None = None  # top-1 agreement with PyTorch on confident queries
    max_abs: NonNegative | None = None  # per tower, largest absolute difference
    # Task checks: an artifact fails when its R@1 or zero-shot top-1 is significantly below the reference's
    # (the paired interval's upper end < 0) AND the drop is larger than this many points.
    max_task_drop: Annotated[float, Range(0.0, 100.0)] | None = None
    # Agreement counts only queries whose reference top-1 beats its runner-up by more than this (cosine units);
    # closer ones are near-ties that tiny numeric differences flip, for better or worse.
    agreement_margin: Annotated[float, Range(0.0, 2.0)] = AGREEMENT_MARGIN
    confidence: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] = 0.95  # of the task intervals

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_names() -> list[str]:
    """The files a parity report writes: parity.json and parity.md."""
    return [PARITY_NAME, str(Path(PARITY_NAME).with_suffix(".md"))]


# Embedding checks for every precision; task checks (points of R@1 / zero-shot top-1 that may be lost, and only
# when the loss is significant) and confident-query agreement for the lossy ones: common/options.py's table.
DEFAULT_TOLERANCES = {precision: Tolerance(**gates) for precision, gates in PARITY_TOLERANCES.items()}
BATCH_INVARIANT_MAX_ABS = 1e-5  # embeddings at batch 1 and batch N closer than this count as batch-invariant


@dataclass
class Check:
    artifact: str
    scope: Literal["image", "text", "retrieval", "zero-shot"]
    metric: Literal["min_cosine", "max_abs", "confident_top1_agreement", "delta_points"]
    value: float | None  # None in a file: the measurement was NaN (JSON has no NaN), which never passes
    threshold: float
    passed: bool
    interval: list[float] | None = None  # delta_points: the paired interval of the change, in points

    def rule(self) -> bool:
        """Whether the value meets the threshold: the one definition of each metric's verdict."""
        v = self.value
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if self.metric == "delta_points":  # fails only when significantly negative AND beyond the allowed drop
            return not (self.interval is not None and self.interval[1] < 0 and v < self.threshold)
        return bool(v <= self.threshold) if self.metric == "max_abs" else bool(v >= self.threshold)

    def validate_fields(self, path: str) -> None:
        if self.metric == "delta_points" and (self.interval is None or len(self.interval) != 2):
            raise UserError(f"'{path}.interval' of a delta_points check must be [low, high], got {self.interval!r}")
        if self.passed != self.rule():
            raise UserError(
                f"'{path}.passed' is {str(self.passed).lower()} but {self.metric} {self.value} against "
                f"{self.threshold} {'passes' if self.rule() else 'fails'}: the report was edited or is corrupt; "
                "run parity again"
            )

    @classmethod
    def judged(
        cls, artifact: str, scope: str, metric: str, value: float, threshold: float, interval: list[float] | None = None
    ) -> Check:
        """A check whose ``passed`` is its metric's ``rule`` (>= threshold, or <= for max_abs)."""
        c = cls(artifact, scope, metric, value, threshold, False, interval)  # type: ignore[arg-type]
        c.passed = c.rule()
        return c

    @classmethod
    def task_drop(cls, artifact: str, scope: str, delta: PairedDelta, max_drop: float) -> Check:
        """Fails only when the change is significantly negative (interval entirely below 0) AND below -max_drop."""
        return cls.judged(
            artifact, scope, "delta_points", 100 * delta.delta, -max_drop, [100 * delta.low, 100 * delta.high]
        )


@dataclass
class TaskScores:
    """Task-level numbers of one model on the parity data (None when not measurable)."""

    retrieval_r1: Fraction | None = None
    retrieval_agreement: Fraction | None = None  # raw: with the PyTorch reference (or, for the teacher, the student)
    zero_shot_top1: Fraction | None = None
    zero_shot_agreement: Fraction | None = None
    # median similarity margin, in the reference's own scores, between its top-1 caption and the one this model
    # picked instead (disagreements only): tiny values mean the disagreements are near-ties
    retrieval_disagreement_margin: float | None = None
    # agreement over the queries whose reference top-1 margin exceeds Tolerance.agreement_margin, and how many
    retrieval_agreement_confident: Fraction | None = None
    retrieval_confident_queries: Count | None = None
    zero_shot_agreement_confident: Fraction | None = None
    zero_shot_confident_queries: Count | None = None
    # change against the reference in points (artifact - reference) with its paired interval [low, high]
    retrieval_r1_delta: Points | None = None
    retrieval_r1_delta_interval: list[Points] | None = None
    zero_shot_top1_delta: Points | None = None
    zero_shot_top1_delta_interval: list[Points] | None = None

    def validate_fields(self, path: str) -> None:
        for key in ("retrieval_r1_delta_interval", "zero_shot_top1_delta_interval"):
            v = getattr(self, key)
            if v is not None and (len(v) != 2 or v[0] > v[1]):
                raise UserError(f"'{path}.{key}' must be [low, high] with low <= high, got {v!r}")


@dataclass
class ArtifactResult:
    name: str  # e.g. "onnxrt" or "trt"
    backend: str
    precision: Precision
    towers: dict[Tower, dict[str, float | None]]  # tower -> max_abs / mean_abs / min_cosine / mean_cosine
    tasks: TaskScores = field(default_factory=TaskScores)
    provider: str | None = None  # ONNX Runtime execution provider that ran it
    # tower -> max abs difference between each input's embedding computed alone (batch 1) and in a batch
    batch_invariance: dict[Tower, NonNegative | None] = field(default_factory=dict)
    batch_invariance_batch: Annotated[int, Range(1, None)] | None = None  # the batch size N of that comparison

    @property
    def batch_invariant(self) -> bool | None:
        if not self.batch_invariance:
            return None
        return all(v is not None and v <= BATCH_INVARIANT_MAX_ABS for v in self.batch_invariance.values())


@dataclass
class TeacherView:
    """The compression view: the student (the PyTorch reference) against the teacher on the same pairs."""

    spec: str
    tasks: TaskScores
    # per tower mean_cosine / min_cosine, when student and teacher embeddings have the same width
    cosine: dict[Tower, dict[str, float | None]] | None = None
    cosine_note: str | None = None  # why the cosine is not comparable


@dataclass
class ParityReport(VersionedFile):
    WHAT: ClassVar[str] = "tinyclip-edge parity report"
    FORMAT: ClassVar[str] = PARITY_FORMAT
    VERSION: ClassVar[int] = PARITY_VERSION

    bundle: str
    precision: Precision
    reference: str
    data: str  # the data spec, or "random" (fallback without data)
    samples: Annotated[int, Range(1, None)]
    normalized: bool
    tolerance: Tolerance
    reference_tasks: TaskScores
    artifacts: list[ArtifactResult]
    checks: list[Check]
    teacher: TeacherView | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # captions, distinct captions, distinct token sequences of the parity data (None for random inputs)
    data_quality: dict[str, Count] | None = None
    # the machine it was measured on (format 2; None in format-1 files): int8 results depend on its ISA class
    host: HostInfo | None = None
    format: Literal["tinyclip-edge/parity"] = PARITY_FORMAT
    format_version: Annotated[int, Range(1, PARITY_VERSION)] = PARITY_VERSION

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def validate_fields(self, path: str) -> None:
        """Each check belongs to a measured artifact, uses the report's own tolerance as its threshold and, for
        the embedding checks, the value measured for that tower; every measured tower has its cosine check."""
        tol = self.tolerance
        wanted = {
            "min_cosine": tol.min_cosine,
            "max_abs": tol.max_abs,
            "confident_top1_agreement": tol.min_agreement,
            "delta_points": None if tol.max_task_drop is None else -tol.max_task_drop,
        }
        arts = {a.name: a for a in self.artifacts}
        for i, c in enumerate(self.checks):
            if c.artifact not in arts:
                raise UserError(f"'checks.{i}.artifact' {c.artifact!r} is not one of the artifacts {list(arts)}")
            if wanted[c.metric] is None or c.threshold != wanted[c.metric]:
                raise UserError(
                    f"'checks.{i}.threshold' {c.threshold} is not the tolerance's {c.metric} ({wanted[c.metric]}): "
                    "the report was edited or is corrupt; run parity again"
                )
            if c.scope in TOWERS:
                measured = arts[c.artifact].towers.get(c.scope, {}).get(c.metric)
                if c.scope not in arts[c.artifact].towers or measured != c.value:
                    raise UserError(
                        f"'checks.{i}.value' {c.value} is not the {c.scope} tower's measured {c.metric} "
                        f"({measured}): the report was edited or is corrupt; run parity again"
                    )
        have = {(c.artifact, c.scope) for c in self.checks if c.metric == "min_cosine"}
        for a in self.artifacts:
            for tower in a.towers:
                if (a.name, tower) not in have:
                    raise UserError(f"artifact {a.name!r} has no min_cosine check for its {tower} tower")

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

    # ------------------------------------------------------------------ read / write
    @classmethod
    def from_data(cls, data: Any, file: str | os.PathLike = "") -> ParityReport:
        """Validate a parsed ``parity.json``; the derived fields (``passed``, ``artifacts[].batch_invariant``)
        must agree with what they are derived from."""
        if not isinstance(data, dict) or not isinstance(data.get("artifacts", []), list):
            return super().from_data(data, file)
        data = dict(data)
        passed = data.pop("passed", None)
        listed = data.get("artifacts", [])
        derived = [a.get("batch_invariant") if isinstance(a, dict) else None for a in listed]
        if "artifacts" in data:  # the schema has no batch_invariant: it is derived, and checked below
            data["artifacts"] = [
                {k: v for k, v in a.items() if k != "batch_invariant"} if isinstance(a, dict) else a for a in listed
            ]
        report = super().from_data(data, file)

        def consistent() -> None:
            for where, said in [("passed", passed)] + [
                (f"artifacts.{i}.batch_invariant", d) for i, d in enumerate(derived)
            ]:
                if said is not None and not isinstance(said, bool):
                    raise UserError(f"field '{where}' must be true or false, got {said!r}")
            if passed is not None and passed != report.passed:
                raise UserError(
                    f"'passed' is {str(passed).lower()} but the checks say {str(report.passed).lower()}: the "
                    "report was edited or is corrupt; run parity again"
                )
            for i, (said, art) in enumerate(zip(derived, report.artifacts)):
                if said is not None and said != art.batch_invariant:
                    raise UserError(
                        f"'artifacts.{i}.batch_invariant' is {str(said).lower()} but its batch_invariance "
                        f"{art.batch_invariance} says otherwise: the report was edited or is corrupt"
                    )

        in_file(file, consistent)
        return report

    @classmethod
    def read(cls, path: str | os.PathLike) -> ParityReport:
        """A validated report from ``parity.json`` or a directory holding one (a bundle, a ``parity --out``)."""
        path = Path(path)
        file = path / PARITY_NAME if path.is_dir() else path
        return cls.from_data(read_json(file, what="parity report"), file)

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Validate, then atomically write ``parity.json`` and ``parity.md`` into `out_dir`; the JSON path."""
        data = self.to_dict()
        type(self).from_data(json.loads(json.dumps(data)), Path(out_dir) / PARITY_NAME)
        json_name, md_name = output_names()
        out = prepare_out_dir(out_dir, [json_name, md_name], "parity report")
        atomic_write_text(out / json_name, json.dumps(data, indent=2) + "\n")
        atomic_write_text(out / md_name, self.to_markdown())
        if is_bundle(out):  # the bundle's manifest lists the report, so a re-export knows it is the toolkit's
            record_in_bundle(out, [json_name, md_name])
        return out / json_name

    def to_markdown(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"# Parity: {self.bundle} ({self.precision}) - {verdict}",
            "",
            f"reference: {self.reference} (PyTorch fp32) | data: {self.data} ({self.samples} pairs) | "
            f"normalized: {self.normalized}"
            + "".join(f" | {a.name} on {a.provider}" for a in self.artifacts if a.provider)
            + (f" | host: {self.host.cpu} ({self.host.isa}, onnxruntime {self.host.onnxruntime})" if self.host else ""),
            "",
            "| artifact | tower | max abs | mean abs | min cosine | mean cosine |",
            "|---|---|---|---|---|---|",
        ]
        for a in self.artifacts:
            for tower, d in a.towers.items():
                lines.append(
                    f"| {a.name} {a.precision} | {tower} | {_fmt(d.get('max_abs'), '.3g')} | "
                    f"{_fmt(d.get('mean_abs'), '.3g')} | {_fmt(d.get('min_cosine'), '.6f')} | "
                    f"{_fmt(d.get('mean_cosine'), '.6f')} |"
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
                + ", ".join(f"{t} {_fmt(v, '.3g')}" for t, v in a.batch_invariance.items())
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
    return _fmt(c.value, ".6g")


def _check_rule(c: Check) -> str:
    if c.metric == "delta_points":
        return f"fails if interval < 0 and Δ < {c.threshold:.3g}"
    return f"{'<=' if c.metric == 'max_abs' else '>='} {c.threshold:.6g}"


def _teacher_section(t: TeacherView) -> str:
    cos_text = (
        "; ".join(
            f"{k} mean cosine {_num(v.get('mean_cosine'))} (min {_num(v.get('min_cosine'))})"
            for k, v in t.cosine.items()
        )
        if t.cosine
        else f"embedding cosine not comparable ({t.cosine_note or 'dims differ'})"
    )
    return (
        "## Compression view: student (PyTorch reference) vs teacher\n\n"
        f"teacher: {t.spec} | {cos_text}\n\n"
        "| model | R@1 image->text | top-1 agreement with student | zero-shot top-1 | zero-shot agreement |\n"
        "|---|---|---|---|---|\n" + _task_row("teacher", t.tasks, margin=False)
    )


def _num(x: float | None) -> str:
    return _fmt(x, ".4f")


def _fmt(x: float | None, spec: str) -> str:
    """A number in a table; NaN (in memory) and null (read back from JSON) both show as 'nan'."""
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _finite(obj: Any) -> Any:
    """NaN is not JSON; report it as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
