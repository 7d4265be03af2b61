"""Distillation objectives compared on the built-in scenes data: same teacher, same student shapes (25%
and 10% of the teacher's parameters, manual inheritance, one stage), same steps, several seeds.

Objectives (every row but the affinity ones trains on top of the CLIP task loss, as the papers do):
  clip only | affinity, fixed scale 50 (TinyCLIP) | affinity, each model's own scale | clip + crd |
  clip + fd + icl | CLIP-KD's best (clip + crd + icl + 2000 fd) | CLIP-RD's full mix (CLIP-KD's + vrd + xrd) |
  DCLIP (a meta teacher on ground-truth boxes for --meta-steps extra steps, then the student with hybrid)

Columns: retrieval R@1 and R@5 (mean of image->text and text->image), mAP, zero-shot top-1, compositional
hard-negative accuracy, image->text top-1 agreement with the teacher; mean ± std over seeds.

    python benchmarks/objectives.py                         # CPU, 3 seeds
    python benchmarks/objectives.py --tiny --out /tmp/obj   # smoke run (tests): tiny teacher, 2 steps

Writes <out>/objectives.json, objectives.md and objectives.png (with matplotlib). Finished runs are kept
in <out>/objectives-runs and reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.teacher import resolve_teacher
from tinyclip_edge.evaluation import markdown_table
from tinyclip_edge.models import save_model_dir

KD = {"clip": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}
OBJECTIVES: dict[str, dict] = {
    "clip only": {"clip": 1.0},
    "affinity (scale 50)": {"affinity": {"weight": 1.0, "scale": "fixed", "fixed_scale": 50.0}},
    "affinity (own scales)": {"affinity": {"weight": 1.0, "scale": "own"}},
    "crd": {"clip": 1.0, "crd": 1.0},
    "fd + icl": {"clip": 1.0, "icl": 1.0, "fd": 2000.0},
    "CLIP-KD best": KD,
    "CLIP-RD full": {**KD, "vrd": 1.0, "xrd": 1.0},
    "DCLIP hybrid": {"hybrid": 1.0},
}
COLUMNS = ("R@1", "R@5", "mAP", "zero-shot top1", "compositional", "agreement")


def stages(name: str, target: float, args: argparse.Namespace) -> list[dict]:
    student = {
        "name": "student",
        "method": "inherit",
        "target": target,
        "steps": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "losses": OBJECTIVES[name],
        "checkpoint_every": 10_000,
        "log_every": 25,
    }
    if name != "DCLIP hybrid":
        return [student]
    meta = {
        "name": "meta-teacher",
        "method": "dclip-meta",
        "teacher": "none",
        "steps": args.meta_steps,
        "batch_size": min(64, args.batch),
        "lr": args.lr,
        "weight_decay": 0.0,
        "losses": {"clip": {"weight": 1.0, "scale": 20.0}},
        "checkpoint_every": 10_000,
        "log_every": 25,
    }
    return [meta, {**student, "teacher": "previous"}]


def metrics(s: dict) -> dict[str, float]:
    return {
        "R@1": (s["i2t"]["R@1"] + s["t2i"]["R@1"]) / 2,
        "R@5": (s["i2t"]["R@5"] + s["t2i"]["R@5"]) / 2,
        "mAP": (s["i2t"]["mAP"] + s["t2i"]["mAP"]) / 2,
        "zero-shot top1": s["zero_shot"]["top1"],
        "compositional": s.get("compositional_acc", float("nan")),
        "agreement": s.get("agreement", {}).get("i2t_top1_agreement", float("nan")),
        "params": s["params"]["total"],
    }


def run_seconds(rd: Path, report: dict) -> float:
    """Training (the last ``elapsed_s`` of each stage in metrics.jsonl) plus evaluation time (from the run's
    report) of one finished run: its own cost, also when a later invocation only reuses it."""
    last: dict[str, float] = {}
    for line in (rd / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "elapsed_s" in row:
            last[row.get("stage", "")] = row["elapsed_s"]
    return round(sum(last.values()) + report.get("eval_seconds", 0.0), 1)


def mean_std(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:scenes-teacher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="student steps (the same for every objective)")
    ap.add_argument("--meta-steps", type=int, default=60, help="DCLIP: meta-teacher head steps (extra, not student)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--targets", type=float, nargs="*", default=[0.25, 0.1])
    ap.add_argument("--val", default="scenes:val")
    ap.add_argument("--only", nargs="*", help="run only these objectives")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--notes", help="a markdown file appended to the table as notes")
    ap.add_argument(
        "--tiny", action="store_true", help="smoke run: a tiny random teacher, 25%% only, 2 steps, 1 seed, 16 pairs"
    )
    args = ap.parse_args()
    if args.tiny:
        args.seeds, args.steps, args.meta_steps, args.batch, args.val = 1, 2, 2, 8, "scenes:val:16"
        args.targets = [0.25]  # the tiny teacher has no 10% student

    out = Path(args.out)
    work = out / "objectives-runs"
    t0 = time.perf_counter()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_package

        teacher = make_package(jitter=0.02)
        args.teacher = "tiny random (tests/conftest.py make_package)"
    else:
        teacher = resolve_teacher(args.teacher, "cpu")
    teacher_dir = save_model_dir(teacher, work / "teacher")
    results: dict = {}
    for target in args.targets:
        for name in OBJECTIVES:
            if args.only and name not in args.only:
                continue
            runs = [one_run(name, target, seed, args, work, teacher_dir) for seed in range(args.seeds)]
            results.setdefault(f"{int(target * 100)}%", {})[name] = runs
            write(args, out, results, teacher, t0)  # after every objective: a killed run keeps its results


def one_run(name: str, target: float, seed: int, args: argparse.Namespace, work: Path, teacher_dir: Path) -> dict:
    """One objective's student at `target` for `seed` (reused when its report exists): its metrics."""
    rd = work / f"{int(target * 100)}pct-{name.replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"
    report = rd / "report.json"
    if not report.is_file():
        dclip = {"dclip": {"regions": "boxes", "max_regions": 3, "max_spans": 3}} if name == "DCLIP hybrid" else {}
        recipe = load_recipe(
            {
                "name": name,
                "teacher": str(teacher_dir),
                "run_dir": str(rd),
                "seed": seed,
                "device": args.device,
                "stages": stages(name, target, args),
                "eval": {"data": args.val},
                **dclip,
            }
        )
        run_compress(recipe, resume=(rd / "run.json").is_file())
    rep = json.loads(report.read_text())
    student = next(s for s in rep["students"] if s["name"] == "student")
    return {"seed": seed, **metrics(student), "teacher": metrics(rep["teacher"]), "seconds": run_seconds(rd, rep)}


def write(args: argparse.Namespace, out: Path, results: dict, teacher, t0: float) -> None:
    command = "python " + " ".join(sys.argv)
    first = next(iter(next(iter(results.values())).values()))[0]["teacher"]
    meta = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "steps": args.steps,
        "meta_steps": args.meta_steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "val": args.val,
        "teacher": args.teacher,
        "teacher_metrics": first,
        "teacher_params": teacher.model.num_params()["total"],
        "seconds": round(time.perf_counter() - t0),  # this invocation (finished runs are reused)
        "run_seconds": round(sum(r["seconds"] for by in results.values() for rs in by.values() for r in rs)),
        "command": command,
    }
    atomic_write_json(out / "objectives.json", {"meta": meta, "objectives": OBJECTIVES, "results": results})
    rows = [
        {
            "budget": "teacher",
            "objective": "",
            "params": f"{meta['teacher_params']:,}",
            **{c: f"{first[c]:.1f}" for c in COLUMNS[:5]},
            "agreement": "",
        }
    ]
    for budget, by_name in results.items():
        for name, runs in by_name.items():
            rows.append(
                {
                    "budget": budget,
                    "objective": name,
                    "params": f"{runs[0]['params']:,}",
                    **{c: mean_std([r[c] for r in runs]) for c in COLUMNS},
                }
            )
    md = [
        f"# Distillation objectives on scenes (`{command}`)",
        "",
        f"Teacher: {args.teacher}, {meta['teacher_params']:,} parameters. Students: manual inheritance to each "
        f"budget, {args.steps} steps at batch {args.batch}, lr {args.lr}; DCLIP's meta teacher trains "
        f"{args.meta_steps} extra steps first. {args.seeds} seed(s), mean ± std. Evaluated on {args.val}: "
        "R@1/R@5/mAP are the means of both retrieval directions (%), agreement is image->text top-1 agreement "
        f"with the teacher (%). Device: {meta['cpu']} ({args.device}); the runs took {meta['run_seconds']} s "
        "of training and evaluation in all.",
        "",
        markdown_table(rows),
        "",
    ]
    if args.notes:
        md += ["## Notes", "", Path(args.notes).read_text(), ""]
    atomic_write_text(out / "objectives.md", "\n".join(md))
    plot(results, first, out / "objectives.png", command)
    print("\n".join(md), flush=True)


def plot(results: dict, teacher: dict[str, float], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tinyclip-edge[plot]')", flush=True)
        return
    budgets = list(results)
    names = list(OBJECTIVES)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col in zip(axes, ("R@1", "compositional")):
        width = 0.8 / max(1, len(budgets))
        for bi, b in enumerate(budgets):
            xs, ys, es = [], [], []
            for ni, n in enumerate(names):
                runs = results[b].get(n)
                if not runs:
                    continue
                vals = [r[col] for r in runs]
                xs.append(ni + bi * width)
                ys.append(statistics.mean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"{b} of the teacher")
        ax.axhline(teacher[col], color="gray", linestyle="--", linewidth=1, label="teacher")
        if col == "compositional":  # every model sits within a few points of the teacher: show the differences
            lows = [statistics.mean(r[col] for r in runs) for by in results.values() for runs in by.values()]
            ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, teacher[col] + 3))
        ax.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{col} (%)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
