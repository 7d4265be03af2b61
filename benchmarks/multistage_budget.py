"""One-shot vs a 3-stage planned chain to 10%, at equal total steps, for several total budgets.

The standing hypothesis (issue 21): at 150 total steps each chain stage is too short to recover before the
next cut, so the chain should catch up with one-shot as the budget grows. For each total budget (default
150, 450 and 1,350 steps: 9x apart) and each mask method (manual; learned with the --rules rule set), the
one-shot student trains all the steps at 10%, the chain 50% -> 25% -> 10% (compress/chain.py plans the
nested shapes) a third of them per stage. R@1 on scenes:val every budget/6 steps; 2 seeds.

    python benchmarks/multistage_budget.py --methods learned --seeds 1 --rules cofi       # the rules pilot,
    python benchmarks/multistage_budget.py --methods learned --seeds 1 --rules tinyclip   # one seed each
    python benchmarks/multistage_budget.py --rules WINNER    # 2 seeds, reusing the pilot's seed 0; run it
                                                             # again until it no longer says "paused"
    python benchmarks/multistage_budget.py --tiny --out /tmp/m                            # smoke run (tests)

On one machine with many cores or a GPU: --shard I/N runs every N-th experiment (N processes side by side,
each with its own --out), --merge DIR... joins their results; benchmarks/claims_gpu.sh does both for a GPU.

Writes <out>/multistage-budget.json, .md and .png (R@1 against total steps per path, the CPU time in the
title); runs live in runs/multistage-budget (--work). Results of both rule sets share the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402

from tinyclip_edge.common.io import atomic_write_text  # noqa: E402
from tinyclip_edge.evaluation import markdown_table  # noqa: E402

STEM = "multistage-budget"


def paths(args: argparse.Namespace) -> dict[str, tuple[str, list[float]]]:
    """path name -> (stage method, targets); a chain's last target is the one-shot target."""
    out = {}
    for m in args.methods:
        kind, label = ("inherit", "manual") if m == "manual" else ("prune", f"learned ({args.rules})")
        out[f"{label} one-shot"] = (kind, args.chain[-1:])
        out[f"{label} chain"] = (kind, args.chain)
    return out


def plan(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for budget in args.budgets:
        sc = cc.scale(args, budget, max(1, budget // 6))
        for seed in range(args.seeds):
            for name, (kind, targets) in paths(args).items():
                per = budget // len(targets)
                steps = [per] * (len(targets) - 1) + [budget - per * (len(targets) - 1)]
                stages = [cc.student_stage(kind, t, n, args.rules) for t, n in zip(targets, steps)]
                fields = {"name": f"{name} @ {budget}", "path": name, "budget": budget, "seed": seed}
                out[f"{name} @ {budget} [seed {seed}]"] = (fields, stages, sc)
    return out


def by_path(exps: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """path -> budget -> final R@1 of each finished seed."""
    out: dict[str, dict[int, list[float]]] = {}
    for e in exps.values():
        if e["done"]:
            out.setdefault(e["path"], {}).setdefault(e["budget"], []).append(e["R@1"])
    return out


def render(data: dict[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    """The markdown and the plot's title."""
    meta, t = data["meta"], data.get("teacher", {})
    results = by_path(data["experiments"])
    budgets = sorted({b for per in results.values() for b in per})
    rows = [
        {
            "path": p,
            "seeds": max(len(v) for v in per.values()),  # a one-seed rules pilot shares the file
            **{f"{b} steps": cc.mean_range(per[b]) if b in per else "" for b in budgets},
        }
        for p, per in results.items()
    ]
    cost = cc.cost_text(meta)
    chain = " -> ".join(f"{round(100 * c)}%" for c in args.chain)
    md = [
        f"# One-shot vs multi-stage by total budget (`{meta['command']}`)",
        "",
        f"Teacher: {meta['teacher']}, {t.get('params', 0):,} parameters, R@1 {t.get('R@1', float('nan')):.1f} on "
        f"{meta['val']}. One-shot: all the steps at {round(100 * args.chain[-1])}%; chain: {chain} (planned, "
        f"nested shapes), a third of the steps per stage. Batch {args.batch}, lr {args.lr}, affinity mimicking; "
        f"R@1 (%), mean [min, max] over the seeds. Ran on {cost}.",
        "",
        markdown_table(rows) if rows else "(nothing finished yet)",
        "",
    ]
    return "\n".join(md), f"{meta['command']}\n{cost}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cc.add_common_args(ap, minutes=20.0)  # + at most one evaluation interval: pieces stay under 30 minutes
    ap.add_argument("--budgets", type=int, nargs="*", default=[150, 450, 1350], help="total steps per path")
    ap.add_argument("--chain", type=float, nargs="*", default=[0.5, 0.25, 0.1], help="the chain's targets")
    ap.add_argument("--methods", nargs="*", choices=["manual", "learned"], default=["manual", "learned"])
    args = ap.parse_args()
    if not all(1 > a > b >= 0 for a, b in zip(args.chain, args.chain[1:] + [0])):
        ap.error("--chain takes falling targets between 0 and 1, e.g. 0.5 0.25 0.1")
    if not args.budgets or min(args.budgets) < len(args.chain):
        ap.error(f"--budgets: every budget needs at least one step per chain stage (>= {len(args.chain)})")
    if args.tiny:  # the tiny teacher has no 10% student
        args.budgets, args.chain, args.batch, args.val = [6, 12], [0.5, 0.4, 0.3], 8, "scenes:val:16"

    out = Path(args.out)
    work = cc.work_dir(args, STEM)
    state = cc.State(out / f"{STEM}.json", args, {"chain": args.chain})
    pkg, tdir = cc.teacher(args, work, state)
    paused = cc.run_all(plan(args), state, pkg, tdir, work, args)
    md, title = render(state.data, args)
    atomic_write_text(out / f"{STEM}.md", md)
    series = {
        p: [(b, sum(v) / len(v)) for b, v in sorted(per.items())]
        for p, per in by_path(state.data["experiments"]).items()
    }
    cc.line_plot(series, out / f"{STEM}.png", title, "total optimiser steps", sorted(args.budgets))
    print(md, flush=True)
    if paused:
        print(f"paused during {paused} after {args.minutes} min: run the same command again to continue", flush=True)


if __name__ == "__main__":
    main()
