"""What benchmarks/inheritance_speedup.py and benchmarks/multistage_budget.py share: the teacher, the
student stages (compression.py's), the mask rule sets, the resumable state file and the line plot.

Each experiment runs through scale_b32.run_experiment: it checkpoints and evaluates R@1 every
``eval_every`` steps and stops at the first such point after ``--minutes``; running the same command
again continues from there and reuses every finished experiment in the state file.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compression  # noqa: E402
import scale_b32  # noqa: E402

from tinyclip_edge.common.io import atomic_write_json, read_json  # noqa: E402
from tinyclip_edge.compress.teacher import resolve_teacher  # noqa: E402
from tinyclip_edge.models import save_model_dir  # noqa: E402

# the prune keys of each rule set (docs/ARCHITECTURE.md, "TinyCLIP's mask rules"); cofi is the default
RULES: dict[str, dict[str, str]] = {
    "cofi": {},
    "tinyclip": {"lagrangian": "one-sided", "log_alpha": "clamped", "eval_gates": "cofi", "sparsity": "blocks"},
}


def add_common_args(ap: argparse.ArgumentParser, minutes: float) -> None:
    ap.add_argument("--teacher", default="builtin:scenes-teacher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val", default="scenes:val")
    ap.add_argument("--rules", choices=sorted(RULES), default="cofi", help="the learned masks' rule set")
    ap.add_argument("--out", default="benchmarks/results", help="where the table, JSON and plot go")
    ap.add_argument("--work", help="where the runs and their checkpoints go (default: the git-ignored runs/<name>)")
    ap.add_argument(
        "--minutes", type=float, default=minutes, help="stop (resumably) at the first evaluation point after this"
    )
    ap.add_argument("--tiny", action="store_true", help="smoke run: a tiny random teacher, a few steps, 16 pairs")


def work_dir(args: argparse.Namespace, stem: str) -> Path:
    return Path(args.work) if args.work else Path("runs") / stem


def student_stage(method: str, target: float, steps: int, rules: str) -> dict[str, Any]:
    """One stage as compression.py trains it (run_experiment sets batch, lr, loss and checkpoints)."""
    st = compression.stage(method, target, steps, 0, 0.0)
    if method == "prune":
        st["prune"].update(RULES[rules])
    return st


def scale(args: argparse.Namespace, steps: int, eval_every: int) -> scale_b32.Scale:
    return dataclasses.replace(
        scale_b32.SCALES["b32"], steps=steps, batch=args.batch, lr=args.lr, eval_every=eval_every, val=args.val
    )


def teacher(args: argparse.Namespace, work: Path, state: State) -> tuple[Any, Path]:
    """The teacher package and its model directory (written once, then reused by every piece), with its
    parameters and R@1 in the state (evaluated once)."""
    tdir = work / "teacher"
    if not (tdir / "config.json").is_file():
        save_model_dir(_new_teacher(args), tdir)
    pkg = scale_b32.evaluate_teacher(state.data, scale(args, 0, 1), tdir, args.device)
    state.data["teacher"].pop("samples", None)  # scale_b32 counts its own teacher's training samples
    return pkg, tdir


def _new_teacher(args: argparse.Namespace) -> Any:
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_package

        return make_package(jitter=0.02)
    return resolve_teacher(args.teacher, "cpu")


class State:
    """The results file: read at start, written after every evaluation point; wall and CPU seconds add up
    over the pieces, so the total cost is known however many invocations it took."""

    def __init__(self, path: Path, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        """`settings`: what every finished run depends on but its key does not name; a state made with other
        settings is refused, since reusing its runs would mix two experiments."""
        self.path = path
        self.data: dict[str, Any] = read_json(path, "results") if path.is_file() else {}
        self.data.setdefault("experiments", {})
        meta = self.data.setdefault("meta", {"wall_seconds": 0.0, "cpu_seconds": 0.0, "pieces": 0})
        settings = {
            **settings,
            "tiny": args.tiny,
            "teacher": args.teacher,
            "batch_size": args.batch,
            "lr": args.lr,
            "val": args.val,
        }
        before = meta.setdefault("settings", settings)
        if before != settings:
            changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v)
            raise SystemExit(
                f"{path} holds runs made with other settings ({changed}): use the same ones, or another --out and --work"
            )
        meta.update(
            {
                "device": args.device,
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "teacher": "tiny random (tests/conftest.py make_package)" if args.tiny else args.teacher,
                "seeds": args.seeds,
                "batch_size": args.batch,
                "lr": args.lr,
                "val": args.val,
                "rules": args.rules,
                "command": "python " + " ".join(sys.argv),
            }
        )
        meta["pieces"] += 1
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._base = (meta["wall_seconds"], meta["cpu_seconds"])

    def save(self) -> None:
        meta = self.data["meta"]
        meta["wall_seconds"] = round(self._base[0] + time.perf_counter() - self._t0, 1)
        meta["cpu_seconds"] = round(self._base[1] + time.process_time() - self._c0, 1)
        meta["threads"] = torch.get_num_threads()  # the runner's choice for this machine's free cores
        atomic_write_json(self.path, self.data)


def run_all(
    plan: dict[str, tuple[dict[str, Any], list[dict[str, Any]], scale_b32.Scale]],
    state: State,
    teacher_pkg: Any,
    tdir: Path,
    work: Path,
    args: argparse.Namespace,
) -> str | None:
    """Run every experiment of `plan` (key -> (entry fields, stages, scale)) not yet done; the key of the one
    that was paused when ``--minutes`` ran out, or None when all are finished."""
    how = SimpleNamespace(device=args.device, deadline=time.monotonic() + 60 * args.minutes, save=state.save)
    for key, (fields, stages, sc) in plan.items():
        entry = state.data["experiments"].setdefault(key, {**fields, "curve": [], "done": False})
        if entry["done"]:
            continue
        if not scale_b32.run_experiment(entry, stages, sc, teacher_pkg, tdir, work, how):
            state.save()
            return key
    state.save()
    return None


def steps_curve(entry: dict[str, Any], batch: int) -> list[tuple[float, float]]:
    """An experiment's R@1 curve against optimiser steps (run_experiment records samples seen)."""
    return [(s / batch, r) for s, r in scale_b32._curve(entry)]


def mean_range(vals: list[float]) -> str:
    """mean [min, max] over seeds (with 2 seeds the range is the honest interval; a t-interval would be
    12.7 standard errors wide)."""
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]"


def seed_mean(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over seeds at the x values every seed's curve has (an unfinished seed shortens the line)."""
    common = set.intersection(*(set(x for x, _ in c) for c in curves)) if curves else set()
    return [(x, statistics.mean(dict(c)[x] for c in curves)) for x in sorted(common)]


def line_plot(
    series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str, xticks: list[float]
) -> bool:
    """One line per series on a log x axis labelled at `xticks`; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tinyclip-edge[plot]')", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, pts in series.items():
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(xticks, [f"{x:g}" for x in xticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("R@1 (mean of i2t, t2i), %, mean over seeds")
    ax.set_title("\n".join(textwrap.fill(line, 140) for line in title.splitlines()), fontsize=8)
    return scale_b32.save_plot(fig, ax, path)
