"""The latency benchmark's report: statistics, JSON / CSV / markdown / text table, and a plot.

``bench.json`` is a versioned file (format ``tinyclip-edge/bench``). Rows and artifacts stay plain dicts in
memory (the CSV and tables are generic over columns), and their schemas are ``BenchRow`` and ``BenchArtifact``:
``BenchReport.save`` validates against them before writing and ``BenchReport.read`` validates a file, including
that the percentiles are ordered and that each speed-up is the first artifact's p50 over the row's.
``device`` and ``settings`` describe the machine and the run and are free-form mappings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from ..common.errors import UserError
from ..common.formats.base import VersionedFile, in_file
from ..common.io import atomic_path, atomic_write_json, atomic_write_text, prepare_out_dir, read_json
from ..common.typed import Range, from_dict
from ..common.vocab import Tower

BENCH_STEM = "bench"  # bench.json, .csv, .md, .png
BENCH_FORMAT, BENCH_VERSION = "tinyclip-edge/bench", 1

Ms = Annotated[float, Range(0.0, None)]
NonNegative = Annotated[float, Range(0.0, None)]
SPEEDUP_RTOL = 1e-9  # a recorded speed-up must equal the recomputed one to rounding
OUTPUT_SUFFIXES = ("json", "csv", "md", "png")


def output_names(stem: str = BENCH_STEM) -> list[str]:
    """The files a bench report writes: <stem>.json, .csv, .md and .png."""
    return [f"{stem}.{ext}" for ext in OUTPUT_SUFFIXES]


# (column, header, format) for the human tables; the JSON and CSV hold every field
COLUMNS = [
    ("artifact", "artifact", "{}"),
    ("tower", "tower", "{}"),
    ("batch", "batch", "{}"),
    ("p50_ms", "p50 ms", "{:.3f}"),
    ("p90_ms", "p90 ms", "{:.3f}"),
    ("p99_ms", "p99 ms", "{:.3f}"),
    ("mean_ms", "mean ms", "{:.3f}"),
    ("std_ms", "std ms", "{:.3f}"),
    ("throughput", "items/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("memory_mb", "mem MB", "{:.1f}"),
    ("gpu_memory_mb", "GPU MB", "{:.1f}"),
    ("energy_mj_per_item", "mJ/item", "{:.2f}"),
]


def latency_stats(samples_ms: list[float], batch: int) -> dict[str, float]:
    x = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        "iters": int(x.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(x.mean()),
        "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min_ms": float(x.min()),
        "max_ms": float(x.max()),
        "throughput": float(batch * x.size / (x.sum() / 1000.0)),
    }


@dataclass
class BenchRow:
    """One timed cell: an artifact's tower at one batch size (``latency_stats`` plus what was measured beside)."""

    artifact: str
    tower: Tower
    batch: Annotated[int, Range(1, None)]
    backend: str
    precision: str | None
    iters: Annotated[int, Range(1, None)]
    p50_ms: Ms
    p90_ms: Ms
    p99_ms: Ms
    mean_ms: Ms
    std_ms: Ms
    min_ms: Ms
    max_ms: Ms
    throughput: NonNegative  # items per second
    memory_mb: float | None = None  # process RSS growth when opened + peak while warming up
    gpu_memory_mb: float | None = None
    speedup: NonNegative | None = None  # the first artifact's p50 / this row's p50, same tower and batch
    power_w: NonNegative | None = None  # tegrastats (Jetson)
    power_samples: Annotated[int, Range(0, None)] | None = None
    power_rail: str | None = None
    energy_mj_per_item: NonNegative | None = None
    dynamic_energy_mj_per_item: NonNegative | None = None

    def validate_fields(self, path: str) -> None:
        order = [self.min_ms, self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms]
        if any(a > b * (1 + 1e-9) for a, b in zip(order, order[1:])) or not (
            self.min_ms * (1 - 1e-9) <= self.mean_ms <= self.max_ms * (1 + 1e-9)
        ):
            raise UserError(
                f"'{path}' latencies are out of order (min {self.min_ms}, p50 {self.p50_ms}, p90 {self.p90_ms}, "
                f"p99 {self.p99_ms}, max {self.max_ms}, mean {self.mean_ms}): the report was edited or is corrupt"
            )


@dataclass
class BenchArtifact:
    """What was benchmarked (``runtimes.artifacts.ArtifactInfo.to_dict()``) and what opening it cost."""

    name: str
    path: str | None
    backend: str
    kind: str
    towers: list[Tower]
    precision: str | None
    size_bytes: Annotated[int, Range(0, 2**53)]
    params: Annotated[int, Range(0, 2**53)] | None = None
    params_by_tower: dict[str, Annotated[int, Range(0, 2**53)]] | None = None
    batch_range: dict[str, list[int | None]] = field(default_factory=dict)
    open_mb: float | None = None
    gpu_memory_mb: float | None = None
    runtime: dict[str, Any] = field(default_factory=dict)  # Runtime.describe()


@dataclass
class BenchDevice:
    """``runtimes.devices.device_facts()``: the parts the tables read are typed; their insides are free-form."""

    os: str
    python: str
    cpu: dict[str, Any]
    libraries: dict[str, str | None] = field(default_factory=dict)
    load_average: list[float] | None = None
    gpu: dict[str, Any] | None = None
    jetson: dict[str, Any] | None = None


@dataclass
class BenchReport(VersionedFile):
    WHAT: ClassVar[str] = "tinyclip-edge bench report"
    FORMAT: ClassVar[str] = BENCH_FORMAT
    VERSION: ClassVar[int] = BENCH_VERSION

    device: dict[str, Any]  # devices.device_facts()
    settings: dict[str, Any]  # batches, tower, iters/seconds, warm-up, end_to_end, ...
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # BenchArtifact fields
    rows: list[dict[str, Any]] = field(default_factory=list)  # BenchRow fields; one per artifact x tower x batch
    notes: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict, repr=False, init=False)  # set by save(); not in files
    format: Literal["tinyclip-edge/bench"] = BENCH_FORMAT
    format_version: Annotated[int, Range(1, BENCH_VERSION)] = BENCH_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("written")
        return d

    # ------------------------------------------------------------------ read / validate
    @classmethod
    def from_data(cls, data: Any, file: str | os.PathLike = "") -> BenchReport:
        """Validate a parsed ``bench.json``: the envelope, then every artifact and row against its schema."""
        report = super().from_data(data, file)
        in_file(file, report.validate_contents)
        return report

    def validate_contents(self) -> None:
        """Every artifact and row against ``BenchArtifact`` / ``BenchRow``, and each speed-up recomputed."""
        from_dict(BenchDevice, self.device, "device", "field")
        # keep the checked values (an int written as 1.0 is an int again), and only the keys the file had
        for i, a in enumerate(self.artifacts):
            typed = from_dict(BenchArtifact, a, f"artifacts.{i}", "field")
            self.artifacts[i] = {k: getattr(typed, k) for k in a}
        names = [a["name"] for a in self.artifacts]
        if len(set(names)) != len(names):
            raise UserError(f"'artifacts' names are not unique: {names}")
        for i, r in enumerate(self.rows):
            typed = from_dict(BenchRow, r, f"rows.{i}", "field")
            self.rows[i] = r = {k: getattr(typed, k) for k in r}
            if names and r["artifact"] not in names:
                raise UserError(f"'rows.{i}.artifact' is {r['artifact']!r}, which is not among the artifacts {names}")
        for i, (r, want) in enumerate(zip(self.rows, self.expected_speedups())):
            got = r.get("speedup")
            if got is not None and (want is None or not math.isclose(got, want, rel_tol=SPEEDUP_RTOL)):
                raise UserError(
                    f"'rows.{i}.speedup' is {got} but the first artifact's p50 over this row's is {want}: the "
                    "report was edited or is corrupt"
                )

    @classmethod
    def read(cls, path: str | os.PathLike) -> BenchReport:
        """A validated report from ``bench.json`` or a directory holding one."""
        path = Path(path)
        file = path / f"{BENCH_STEM}.json" if path.is_dir() else path
        return cls.from_data(read_json(file, what="bench report"), file)

    def expected_speedups(self) -> list[float | None]:
        """Per row: the first artifact's p50 / this row's p50, for the same tower and batch (>1: faster); None
        where there is no first artifact or it lacks that cell."""
        if not self.artifacts:
            return [None] * len(self.rows)
        first = self.artifacts[0]["name"]
        base = {(r["tower"], r["batch"]): r["p50_ms"] for r in self.rows if r["artifact"] == first}
        refs = [base.get((r["tower"], r["batch"])) for r in self.rows]
        return [ref / r["p50_ms"] if ref and r["p50_ms"] > 0 else None for ref, r in zip(refs, self.rows)]

    def add_speedups(self) -> None:
        """Set each row's ``speedup`` (``expected_speedups``)."""
        if not self.artifacts:
            return
        for r, speedup in zip(self.rows, self.expected_speedups()):
            r["speedup"] = speedup

    # ------------------------------------------------------------------ renderings
    def _cells(self) -> tuple[list[str], list[list[str]]]:
        cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in self.rows)]
        body = [[("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in cols] for r in self.rows]
        return [h for _, h, _ in cols], body

    def table(self) -> str:
        """Aligned plain text for a terminal."""
        head, body = self._cells()
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += [
            "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body
        ]
        return "\n".join(lines)

    def summary(self, size_digits: int = 0) -> str:
        """Markdown, one line per artifact: p50 ms per tower x batch with the speed-up over the first artifact."""
        cells = sorted({(r["tower"], r["batch"]) for r in self.rows})
        by = {(r["artifact"], r["tower"], r["batch"]): r for r in self.rows}
        head = ["artifact", "runtime", "precision", "params (M)", "MB on disk"] + [f"{t} b{b} p50 ms" for t, b in cells]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in self.artifacts:
            row = [
                a["name"],
                a["backend"],
                a["precision"] or "-",
                f"{a['params'] / 1e6:.{2 if size_digits else 1}f}" if a.get("params") else "-",
                f"{a['size_bytes'] / 2**20:.{size_digits}f}" if a.get("size_bytes") else "-",
            ]
            for t, b in cells:
                r = by.get((a["name"], t, b))
                digits = 1 if r is None or r["p50_ms"] >= 1 else 3
                speedup = "" if r is None or r.get("speedup") is None else f" ({r['speedup']:.2f}x)"
                row.append("-" if r is None else f"{r['p50_ms']:.{digits}f}{speedup}")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        head, body = self._cells()
        gpu, cpu = self.device.get("gpu") or {}, self.device.get("cpu") or {}
        where = gpu.get("name") or cpu.get("model") or "unknown device"
        if self.device.get("jetson"):
            j = self.device["jetson"]
            where = (
                f"{j.get('module', 'Jetson')} (JetPack {j.get('jetpack')}, power mode "
                f"{(j.get('nvpmodel') or {}).get('name', '?')})"
            )
        lines = [
            f"Latency on {where}; {self._settings_line()}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        sizes = [
            f"{a['name']}: {a['size_bytes'] / 2**20:.1f} MiB on disk"
            + (f", {a['params'] / 1e6:.2f} M params" if a.get("params") else "")
            for a in self.artifacts
        ]
        lines += ["", *[f"- {s}" for s in sizes], *[f"- note: {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def _settings_line(self) -> str:
        s = self.settings
        count = f"{s['iters']} iterations" if s.get("iters") else f">= {s.get('seconds')} s"
        mode = "end to end (preprocessing/tokenising included)" if s.get("end_to_end") else "model only"
        threads = f", {s['threads']} CPU thread(s)" if s.get("threads") else ""
        load = self.device.get("load_average")
        busy = f", load average {load[0]} at the start" if load else ""
        return f"device {s.get('device')}{threads}, {count} per cell after {s.get('warmup')} warm-up, {mode}{busy}."

    def to_csv(self) -> str:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def plot(self, path: str | os.PathLike) -> bool:
        """Latency (p50) against batch, one line per artifact, one panel per tower; False without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        towers = sorted({r["tower"] for r in self.rows})
        fig, axes = plt.subplots(1, len(towers), figsize=(5.5 * len(towers), 4), squeeze=False)
        for ax, tower in zip(axes[0], towers):
            for a in self.artifacts:
                pts = sorted(
                    (r["batch"], r["p50_ms"]) for r in self.rows if r["artifact"] == a["name"] and r["tower"] == tower
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=a["name"])
            ax.set(title=f"{tower} tower", xlabel="batch", ylabel="p50 latency (ms)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        return True

    def save(self, out_dir: str | os.PathLike, stem: str = BENCH_STEM) -> dict[str, Path]:
        """Validate, then write <stem>.json, .csv, .md and .png (when matplotlib is there) into out_dir."""
        type(self).from_data(json.loads(json.dumps(self.to_dict())), Path(out_dir) / f"{stem}.json")
        out = prepare_out_dir(out_dir, output_names(stem), "bench report")
        files = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
        if not self.plot(out / f"{stem}.png"):
            self.notes.append("no plot: matplotlib is not installed (pip install 'tinyclip-edge[plot]')")
        else:
            files["png"] = out / f"{stem}.png"
        atomic_write_json(files["json"], self.to_dict())
        atomic_write_text(files["csv"], self.to_csv())
        atomic_write_text(files["md"], self.to_markdown())
        self.written = files
        return files
