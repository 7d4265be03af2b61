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
    ap.add_argument(
        "--shard",
        type=parse_shard,
        help="I/N: run only every N-th experiment of the plan from the I-th (0-based), for N processes side by "
        "side; give each its own --out (they may share --work), then --merge their folders",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        type=Path,
        help="first merge the finished experiments of these folders' result files (shards) into --out's",
    )


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (for example 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be in 0..N-1")
    return i, n


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
        if args.merge:
            merge_states(path, args.merge)
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
        self.device = device_name(args.device)
        self.ran = False  # run_all sets it: a merge-only invocation adds no device of its own
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
        if self.ran:  # an invocation that only merges or renders adds no device and no cost
            if self.device not in meta.setdefault("devices", []):
                meta["devices"].append(self.device)
            meta["wall_seconds"] = round(self._base[0] + time.perf_counter() - self._t0, 1)
            meta["cpu_seconds"] = round(self._base[1] + time.process_time() - self._c0, 1)
            meta["threads"] = torch.get_num_threads()  # the runner's choice for this machine's free cores
        meta.setdefault("threads", torch.get_num_threads())
        atomic_write_json(self.path, self.data)


def device_name(device: str) -> str:
    """What ran the experiments, for the table: the GPU's name on CUDA, else the CPU's."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (cuda)"
    return f"{platform.processor() or platform.machine()} ({device})"


MERGED_NOTE = "; each shard's command is in the JSON, meta.merged"


def cost_text(meta: dict[str, Any]) -> str:
    shards = f", {meta['parallel_shards']} shards side by side" if meta.get("parallel_shards") else ""
    return (
        f"{', '.join(meta.get('devices', [meta['device']]))}; {meta['cpu_seconds'] / 60:.0f} min CPU time "
        f"({meta['wall_seconds'] / 60:.0f} min wall{shards}, {meta['threads']} threads per process, "
        f"{meta['pieces']} piece(s){MERGED_NOTE if shards else ''})"
    )


def merge_states(target: Path, folders: list[Path]) -> None:
    """Merge the result files `folders`/<target's name> (shards run side by side) into `target`.

    Only finished experiments are taken from the shards: an unfinished one's checkpoints live in its shard's
    --work, possibly on another machine, so it runs again here (from its checkpoint where this --work holds
    it). Runs made with other settings are refused in one line, as State refuses them. CPU seconds add up;
    wall seconds add the longest shard (they ran at once). Merging a folder again adds only what its shard
    did since (its costs are recorded per folder), so a repeated command counts nothing twice.
    """
    merged: dict[str, Any] = read_json(target, "results") if target.is_file() else {}
    merged.setdefault("experiments", {})
    meta = merged.setdefault("meta", {"wall_seconds": 0.0, "cpu_seconds": 0.0, "pieces": 0})
    walls = []
    for folder in folders:
        path = folder / target.name
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist: name the folders the shards wrote (their --out)")
        shard = read_json(path, "results")
        sm = shard.get("meta", {})
        if meta.setdefault("settings", sm.get("settings")) != sm.get("settings"):
            raise SystemExit(
                f"--merge: {path} holds runs made with other settings than {target}'s: merge like with like"
            )
        seen = meta.setdefault("merged", {}).get(str(folder), {"cpu_seconds": 0.0, "wall_seconds": 0.0, "pieces": 0})
        meta["merged"][str(folder)] = {k: sm.get(k, 0) for k in seen} | {"command": sm.get("command")}
        for key, e in shard.get("experiments", {}).items():
            if e.get("done") and not merged["experiments"].get(key, {}).get("done"):
                merged["experiments"][key] = e
        merged.setdefault("teacher", shard.get("teacher"))
        meta["cpu_seconds"] += sm.get("cpu_seconds", 0.0) - seen["cpu_seconds"]
        meta["pieces"] += sm.get("pieces", 0) - seen["pieces"]
        meta["devices"] = list(dict.fromkeys([*meta.get("devices", []), *sm.get("devices", [])]))
        meta["threads"] = sm.get("threads", meta.get("threads"))
        walls.append(sm.get("wall_seconds", 0.0) - seen["wall_seconds"])
    meta["wall_seconds"] += max(walls)
    meta["parallel_shards"] = max(meta.get("parallel_shards", 0), len(folders))
    if merged.get("teacher") is None:
        merged.pop("teacher")
    atomic_write_json(target, merged)


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
    if args.shard:
        i, n = args.shard
        plan = {k: v for j, (k, v) in enumerate(plan.items()) if j % n == i}
    for key, (fields, stages, sc) in plan.items():
        entry = state.data["experiments"].setdefault(key, {**fields, "curve": [], "done": False})
        if entry["done"]:
            continue
        state.ran = True
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
