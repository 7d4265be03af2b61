"""Evidence for TinyCLIP's compression claims on the built-in scenes data, at CPU scale.

Two questions, each at equal parameter budget and equal optimiser steps:
  1. automatic inheritance (learned masks) vs manual inheritance (importance-ranked), at 50%
  2. one-shot vs multi-stage compression (50% -> 25%, and 50% -> 25% -> 10%), for both methods

Every student distils from the same built-in teacher with affinity mimicking and is evaluated on
scenes:val (R@1 = mean of image->text and text->image). Rerun:

    python benchmarks/compression.py                       # CPU, 1 seed, ~15 min on 2 cores
    python benchmarks/compression.py --device cuda --seeds 3 --steps 300

At ViT-B/32 scale (a teacher trained here on scenes at 224 px; learning curves; the inheritance
speed-up; the planned multi-stage chain), in resumable pieces of --minutes each (benchmarks/scale_b32.py):

    python benchmarks/compression.py --scale b32 --device cuda --minutes 9    # run again to continue
    python benchmarks/compression.py --scale b32 --device cpu --tiny          # smoke test (CI)

Writes <out>/compression.json and compression.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.teacher import resolve_teacher
from tinyclip_edge.evaluation import markdown_table
from tinyclip_edge.models import save_model_dir


def stage(method: str, target: float, steps: int, batch: int, lr: float) -> dict:
    st = {
        "method": method,
        "target": target,
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "losses": {"affinity": 1.0},
        "checkpoint_every": 10_000,
        "log_every": 25,
    }
    if method == "prune":  # faster mask and multiplier rates suit a schedule of a few hundred steps
        st["prune"] = {"mask_lr": 0.2, "lambda_lr": 0.5, "warmup": 0.5, "mask_steps": 0.6}
    return st


def experiments(steps: int) -> dict[str, tuple[str, list[tuple[str, float, int]]]]:
    """name -> (question, [(method, target, steps), ...]); totals are equal within a question."""
    s = steps
    return {
        "manual 50%": ("auto vs manual", [("inherit", 0.5, s)]),
        "auto 50%": ("auto vs manual", [("prune", 0.5, s)]),
        "manual 25% one-shot": ("one-shot vs multi-stage", [("inherit", 0.25, 2 * s)]),
        "manual 50%->25%": ("one-shot vs multi-stage", [("inherit", 0.5, s), ("inherit", 0.25, s)]),
        "auto 25% one-shot": ("one-shot vs multi-stage", [("prune", 0.25, 2 * s)]),
        "auto 50%->25%": ("one-shot vs multi-stage", [("prune", 0.5, s), ("prune", 0.25, s)]),
        "manual 10% one-shot": ("one-shot vs multi-stage (10%)", [("inherit", 0.1, 3 * s)]),
        "manual 50%->25%->10%": (
            "one-shot vs multi-stage (10%)",
            [("inherit", 0.5, s), ("inherit", 0.25, s), ("inherit", 0.1, s)],
        ),
        "auto 10% one-shot": ("one-shot vs multi-stage (10%)", [("prune", 0.1, 3 * s)]),
        "auto 50%->25%->10%": (
            "one-shot vs multi-stage (10%)",
            [("prune", 0.5, s), ("prune", 0.25, s), ("prune", 0.1, s)],
        ),
    }


def r1(res: dict) -> float:
    return (res["i2t"]["R@1"] + res["t2i"]["R@1"]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:scenes-teacher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150, help="steps per stage (one-shot runs get the total)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val", default="scenes:val")
    ap.add_argument("--only", nargs="*", help="run only these experiments")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--notes", help="a markdown file appended to the table as notes")
    ap.add_argument(
        "--scale",
        choices=["cpu", "b32"],
        default="cpu",
        help="cpu: the scenes-teacher experiments above; b32: a ViT-B/32-class teacher (scale_b32.py)",
    )
    ap.add_argument("--tiny", action="store_true", help="with --scale b32: a tiny smoke run of the whole path")
    ap.add_argument("--minutes", type=float, default=9.0, help="with --scale b32: stop (resumably) after this long")
    args = ap.parse_args()

    out = Path(args.out)
    if args.scale == "b32":
        return main_b32(args, out)
    work = out / "compression-runs"
    t0 = time.perf_counter()
    teacher = resolve_teacher(args.teacher, "cpu")
    teacher_dir = save_model_dir(teacher, work / "teacher")
    rows, results = [], {}
    for name, (question, plan) in experiments(args.steps).items():
        if args.only and name not in args.only:
            continue
        per_seed = [one_run(name, plan, seed, args, work, teacher_dir) for seed in range(args.seeds)]
        results[name] = {"question": question, "stages": plan, "runs": per_seed}
        rows.append(table_row(question, name, plan, per_seed))

        write(args, out, results, rows, teacher, t0)  # after every experiment: a killed run keeps its results


def one_run(name: str, plan: Any, seed: int, args: argparse.Namespace, work: Path, teacher_dir: Path) -> dict:
    """One experiment for `seed` (continued when its run exists): the last student's metrics."""
    rd = work / f"{name.replace(' ', '_').replace('%', 'pct').replace('>', '')}-seed{seed}"
    recipe = load_recipe(
        {
            "name": name,
            "teacher": str(teacher_dir),
            "run_dir": str(rd),
            "seed": seed,
            "device": args.device,
            "stages": [stage(m, t, n, args.batch, args.lr) for m, t, n in plan],
            "eval": {"data": args.val},
        }
    )
    res = run_compress(recipe, resume=(rd / "run.json").is_file()).report
    student = res["students"][-1]
    return {
        "seed": seed,
        "R@1": r1(student),
        "i2t_R@1": student["i2t"]["R@1"],
        "t2i_R@1": student["t2i"]["R@1"],
        "zero_shot_top1": student["zero_shot"]["top1"],
        "compositional": student["compositional_acc"],
        "params": student["params"]["total"],
        "teacher_R@1": r1(res["teacher"]),
    }


def table_row(question: str, name: str, plan: Any, per_seed: list[dict]) -> dict:
    vals = [p["R@1"] for p in per_seed]
    return {
        "question": question,
        "student": name,
        "params": f"{per_seed[0]['params']:,}",
        "total steps": sum(n for _, _, n in plan),
        "R@1 (mean)": f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""),
        "zero-shot top1": f"{statistics.mean(p['zero_shot_top1'] for p in per_seed):.1f}",
        "compositional": f"{statistics.mean(p['compositional'] for p in per_seed):.1f}",
    }


def main_b32(args: argparse.Namespace, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import scale_b32

    status = scale_b32.run_scale(args, out)
    state = out / "compression-b32.json"
    results = json.loads(state.read_text()) if state.is_file() else {}
    if results:
        md = scale_b32.render(results, " ".join(sys.argv))
        atomic_write_text(out / "compression-b32.md", md)
        scale_b32.plot(results, out / "compression-b32.png")
        print(md, flush=True)
    if not status["done"]:
        print(
            f"paused during {status['phase']} after {args.minutes} min: run the same command again to continue",
            flush=True,
        )


def write(args: argparse.Namespace, out: Path, results: dict, rows: list, teacher, t0: float) -> None:
    teacher_r1 = next(iter(results.values()))["runs"][0]["teacher_R@1"]
    meta = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "steps_per_stage": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "val": args.val,
        "teacher": args.teacher,
        "teacher_R@1": teacher_r1,
        "teacher_params": teacher.model.num_params()["total"],
        "seconds": round(time.perf_counter() - t0),
        "command": " ".join(sys.argv),
    }
    atomic_write_json(out / "compression.json", {"meta": meta, "results": results})
    md = [
        f"# Compression evidence on scenes (`{' '.join(sys.argv)}`)",
        "",
        f"Teacher: {args.teacher}, {meta['teacher_params']:,} parameters, R@1 {teacher_r1:.1f} on {args.val}. "
        f"Device: {meta['gpu'] or meta['cpu']} ({args.device}); {args.seeds} seed(s); {args.steps} steps per stage "
        f"at batch {args.batch}; affinity mimicking; R@1 is the mean of image->text and text->image, in %.",
        "",
        markdown_table(rows),
        "",
    ]
    if args.notes:
        md += ["## Notes", "", Path(args.notes).read_text(), ""]
    atomic_write_text(out / "compression.md", "\n".join(md))
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
