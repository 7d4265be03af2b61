"""TinyCLIP's inheritance speed-up, as the paper defines it, on the built-in scenes teacher.

At 50% and 25% of the teacher's parameters: the inherited student (manual and learned masks) trains
--steps steps; a student of the manual student's shape trains from random initialisation with the same
teacher and loss for --factor x as many. R@1 on scenes:val is evaluated every --eval-every steps. The
speed-up of a student is the steps scratch needs to reach the student's final R@1 (linear between the
two evaluation points around the first crossing) / the student's steps; ">8x" when scratch never gets
there. Reported per seed and as mean [min, max] over seeds.

    python benchmarks/inheritance_speedup.py                     # CPU, 2 seeds, in 25-minute pieces
    python benchmarks/inheritance_speedup.py                     # again: continues where it stopped
    python benchmarks/inheritance_speedup.py --tiny --out /tmp/s # smoke run (tests)

On one machine with many cores or a GPU: --shard I/N runs every N-th experiment (N processes side by side,
each with its own --out), --merge DIR... joins their results; benchmarks/claims_gpu.sh does both for a GPU.

Writes <out>/inheritance-speedup.json, .md and .png; runs live in runs/inheritance-speedup (--work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402

from tinyclip_edge.common.io import atomic_write_text  # noqa: E402
from tinyclip_edge.compress.shapes import shape_for_ratio  # noqa: E402
from tinyclip_edge.evaluation import markdown_table  # noqa: E402

STEM = "inheritance-speedup"


def steps_to_reach(curve: list[tuple[float, float]], goal: float) -> float | None:
    """Steps at which `curve` ((steps, R@1), ascending steps) first reaches `goal`, linear between the
    evaluation points around the crossing; None when it never does. A curve whose first point already
    reaches the goal gives that point's steps (an upper bound: nothing was measured before it)."""
    prev: tuple[float, float] | None = None
    for steps, value in curve:
        if value >= goal:
            if prev is None:
                return steps
            frac = (goal - prev[1]) / (value - prev[1])
            return prev[0] + frac * (steps - prev[0])
        prev = (steps, value)
    return None


def speedup(scratch: list[tuple[float, float]], student_r1: float, student_steps: float) -> float | None:
    """TinyCLIP's speed-up: steps scratch needs to reach the student's final R@1 / the student's steps;
    None when scratch never reaches it within its curve (report as "> its length / the student's steps")."""
    need = steps_to_reach(scratch, student_r1)
    return None if need is None else need / student_steps


def speedup_summary(values: list[float | None], factor: float) -> str:
    """mean [min, max] over seeds; ">8x" parts where scratch never reached the student."""
    reached = [v for v in values if v is not None]
    if not reached:
        return f">{factor:g}x"
    if len(reached) < len(values):
        return f"[{min(reached):.2f}x, >{factor:g}x]"
    if len(reached) == 1:
        return f"{reached[0]:.2f}x"
    return f"{statistics.mean(reached):.2f}x [{min(reached):.2f}, {max(reached):.2f}]"


def plan(args: argparse.Namespace, teacher_shape: Any) -> dict[str, Any]:
    learned = f"learned ({args.rules})"
    sc_student = cc.scale(args, args.steps, args.eval_every)
    sc_scratch = cc.scale(args, args.factor * args.steps, args.eval_every)
    out: dict[str, Any] = {}
    for target in args.targets:
        pct = f"{round(100 * target)}%"
        for seed in range(args.seeds):
            for method, kind in (("manual", "inherit"), (learned, "prune")):
                fields = {"name": f"{method} {pct}", "seed": seed, "target": target, "role": "student"}
                out[f"{method} {pct} [seed {seed}]"] = (
                    fields,
                    [cc.student_stage(kind, target, args.steps, args.rules)],
                    sc_student,
                )
            scratch = cc.student_stage("scratch", target, args.factor * args.steps, args.rules)
            scratch["shape"] = shape_for_ratio(teacher_shape, target).to_dict()  # the manual student's
            fields = {"name": f"scratch {pct}", "seed": seed, "target": target, "role": "scratch"}
            out[f"scratch {pct} [seed {seed}]"] = (fields, [scratch], sc_scratch)
    return out


def speedups(exps: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for e in exps.values():
        if e["role"] != "student" or not e["done"]:
            continue
        sk = f"scratch {round(100 * e['target'])}% [seed {e['seed']}]"
        if not exps.get(sk, {}).get("done"):
            continue
        s = speedup(cc.steps_curve(exps[sk], args.batch), e["R@1"], args.steps)
        rows.append({"student": e["name"], "seed": e["seed"], "student_R@1": e["R@1"], "speedup": s})
    return rows


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    meta, exps = data["meta"], data["experiments"]
    rows = []
    for name in dict.fromkeys(e["name"] for e in exps.values() if e["role"] == "student"):
        runs = [e for e in exps.values() if e["name"] == name and e["done"]]
        sp = [s["speedup"] for s in data["speedups"] if s["student"] == name]
        scratch = (
            [e for e in exps.values() if e["role"] == "scratch" and e["done"] and e["target"] == runs[0]["target"]]
            if runs
            else []
        )
        at_same = [
            v for e in scratch for x, v in cc.steps_curve(e, args.batch) if x == args.steps
        ]  # scratch at the student's own step count
        rows.append(
            {
                "student": name,
                "params": f"{runs[0]['params']:,}" if runs else "",
                "seeds done": len(runs),
                f"R@1 after {args.steps} steps": cc.mean_range([e["R@1"] for e in runs]) if runs else "",
                f"scratch R@1 after {args.steps}": cc.mean_range(at_same) if at_same else "",
                f"scratch R@1 after {args.factor * args.steps}": cc.mean_range([e["R@1"] for e in scratch])
                if scratch
                else "",
                "speed-up per seed": ", ".join("n/a" if v is None else f"{v:.2f}x" for v in sp),
                "speed-up, mean [min, max]": speedup_summary(sp, args.factor) if sp else "",
            }
        )
    t = data.get("teacher", {})
    return "\n".join(
        [
            f"# Inheritance speed-up on scenes (`{meta['command']}`)",
            "",
            f"Teacher: {meta['teacher']}, {t.get('params', 0):,} parameters, R@1 {t.get('R@1', float('nan')):.1f} "
            f"on {meta['val']}. Students train {args.steps} steps, scratch (the manual student's shape, random "
            f"initialisation, same teacher and affinity loss) {args.factor * args.steps}, batch {args.batch}, lr "
            f"{args.lr}; learned masks with the {args.rules} rules; R@1 every {args.eval_every} steps. Speed-up "
            "(TinyCLIP's definition): steps scratch needs to reach the student's final R@1, linear between "
            f"evaluation points, / {args.steps}; n/a = scratch never got there (>{args.factor}x); "
            f"scratch already there at its first point ({args.eval_every} steps) counts that point (an upper "
            f"bound). {meta['seeds']} seed(s); [min, max] over seeds. Ran on {cc.cost_text(meta)}.",
            "",
            markdown_table(rows),
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cc.add_common_args(ap, minutes=25.0)
    ap.add_argument("--steps", type=int, default=150, help="the inherited students' steps")
    ap.add_argument("--factor", type=int, default=8, help="scratch trains this many times as long")
    ap.add_argument("--eval-every", type=int, default=50, help="R@1 at every multiple of this many steps")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.5, 0.25])
    args = ap.parse_args()
    if min(args.steps, args.factor, args.eval_every) < 1 or not all(0 < t < 1 for t in args.targets):
        ap.error("--steps, --factor and --eval-every must be >= 1 and every --targets value between 0 and 1")
    if args.tiny:
        args.steps, args.factor, args.eval_every, args.batch, args.val = 2, 8, 2, 8, "scenes:val:16"

    out = Path(args.out)
    work = cc.work_dir(args, STEM)
    state = cc.State(out / f"{STEM}.json", args, {k: vars(args)[k] for k in ("steps", "factor", "eval_every")})
    pkg, tdir = cc.teacher(args, work, state)
    paused = cc.run_all(plan(args, pkg.shape), state, pkg, tdir, work, args)
    data = state.data
    data["speedups"] = speedups(data["experiments"], args)
    state.save()
    md = render(data, args)
    atomic_write_text(out / f"{STEM}.md", md)
    exps = data["experiments"].values()
    series = {
        name: cc.seed_mean([cc.steps_curve(e, args.batch) for e in exps if e["name"] == name])
        for name in dict.fromkeys(e["name"] for e in exps)
    }
    ticks = [args.eval_every] + [args.steps * 2**k for k in range(args.factor.bit_length())]
    cc.line_plot(series, out / f"{STEM}.png", data["meta"]["command"], "optimiser steps", sorted(set(ticks)))
    print(md, flush=True)
    if paused:
        print(f"paused during {paused} after {args.minutes} min: run the same command again to continue", flush=True)


if __name__ == "__main__":
    main()
