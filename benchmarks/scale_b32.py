"""TinyCLIP's claims at ViT-B/32 scale: the inheritance speed-up and multi-stage progressive compression.

Used by ``benchmarks/compression.py --scale b32``. A ViT-B/32-class CLIP (224 px, 12+12 layers) is
trained from scratch on scenes (>= 1M samples by default), then, at equal student steps and batch:

- manual inheritance vs learned masks vs training from scratch (same loss, same teacher), at 50% and 10%;
- one-shot 10% vs the planned manual chain 50% -> 25% -> 10% (compress/chain.py) with the same total;
- learning curves (R@1 on scenes:val against samples seen), from which the inheritance speed-up is
  computed: samples that scratch needs to reach its final R@1 / samples the inherited student needs to
  reach the same (the paper reports 1.4-7.8x).

GPU time comes in pieces: every run checkpoints at each evaluation point and stops when ``--minutes``
are used up; running the same command again continues where it stopped (the teacher, then each
experiment in turn). Curves are evaluated from the checkpoints, so a paused run loses nothing.
``--tiny`` swaps in a small teacher, 32 px and a few steps: a smoke test of the whole path (CI runs it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tinyclip_edge.common.io import atomic_write_json, read_json
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.rundir import STATE_FILE
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.shapes import shape_for_ratio
from tinyclip_edge.compress.trainer import load_checkpoint, read_checkpoint_meta
from tinyclip_edge.evaluation import evaluate
from tinyclip_edge.models import load_model_dir


@dataclass
class Scale:
    teacher_preset: str
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    steps: int  # student steps per experiment (a chain splits them over its stages)
    batch: int
    lr: float
    eval_every: int
    val: str
    small: float  # the extreme target (the paper's 10%; the tiny teacher cannot go that far)


SCALES = {
    # ~1M teacher samples; ~8 min teacher + ~1.5 min per student on one H100 (the budget)
    "b32": Scale("vit-b-32-scenes", 2000, 512, 5e-4, 360, 256, 2e-4, 60, "scenes:val:1000", 0.1),
    "tiny": Scale("scenes-tiny", 8, 32, 3e-3, 9, 16, 1e-3, 3, "scenes:val:60", 0.3),
}


TEACHER_STAGE = "scratch-b32"


class _Pause(Exception):
    """Raised from the runner's step hook at an evaluation point (right after that step's checkpoint)."""


def r1(res: dict[str, Any]) -> float:
    return (res["i2t"]["R@1"] + res["t2i"]["R@1"]) / 2


def experiments(teacher_shape: Any, s: int, small: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """name -> stages; every experiment gets `s` student steps in total. `small`: the extreme target."""

    def st(method: str, target: float, steps: int, **kw: Any) -> dict[str, Any]:
        d = {"method": method, "target": target, "steps": steps, **kw}
        if method == "prune":
            d["prune"] = {"mask_lr": 0.2, "lambda_lr": 0.5, "warmup": 0.5, "mask_steps": 0.6}
        return d

    def scratch(target: float) -> dict[str, Any]:  # the manual student's shape, random initialisation
        return st("scratch", target, s, shape=shape_for_ratio(teacher_shape, target).to_dict())

    third = max(1, s // 3)
    p = f"{round(100 * small)}%"
    mid = round((0.5 * small) ** 0.5, 3)  # geometric middle of the chain
    return {
        "manual 50%": [st("inherit", 0.5, s)],
        "auto 50%": [st("prune", 0.5, s)],
        "scratch 50%": [scratch(0.5)],
        f"manual {p} one-shot": [st("inherit", small, s)],
        f"auto {p} one-shot": [st("prune", small, s)],
        f"scratch {p}": [scratch(small)],
        f"manual 50%->{round(100 * mid)}%->{p} (planned chain)": [
            st("inherit", 0.5, third),
            st("inherit", mid, third),
            st("inherit", small, s - 2 * third),
        ],
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _stage_in_progress(run_dir: Path) -> str | None:
    state = read_json(run_dir / STATE_FILE, "run state") if (run_dir / STATE_FILE).is_file() else {"stages": {}}
    running = [n for n, v in state["stages"].items() if v == "running"]
    return running[-1] if running else None


def run_in_pieces(
    recipe: dict[str, Any], pause_every: int, deadline: float, on_point: Any = None
) -> dict[str, Any] | None:
    """Run `recipe` to the end or until `deadline`; returns the run's report when finished, else None.

    Every `pause_every` steps (the recipe checkpoints at the same steps, so the checkpoint of that step is
    already written) the runner's step hook may pause the run: to evaluate the checkpoint
    (`on_point(stage_name, stage_cfg, ckpt_dir)`) or because the time is up. The run then resumes, bit-exact,
    from that checkpoint.
    """
    run_dir = Path(recipe["run_dir"])
    while True:
        rec = load_recipe(recipe)

        def hook(state: Any) -> None:
            if state.step % pause_every == 0 and (on_point is not None or time.monotonic() > deadline):
                raise _Pause

        try:
            result = run_compress(rec, resume=(run_dir / STATE_FILE).is_file(), on_step=hook)
            return result.report or {}
        except _Pause:
            name = _stage_in_progress(run_dir)
            if name is not None and on_point is not None:
                base = name.removesuffix(".masks")
                cfg = next(s for s in rec.stages if s.name == base)
                on_point(name, cfg, run_dir / "checkpoints" / name)
            if time.monotonic() > deadline:
                return None


def _checkpoint_r1(ckpt: Path, cfg: Any, reference: Any, val: str, device: str) -> tuple[int, float]:
    meta = read_checkpoint_meta(ckpt)
    task, _, _ = load_checkpoint(ckpt, cfg)
    model = task.finalize().eval()  # a learned-mask student is judged as it would be materialised now
    return meta["step"], r1(evaluate(reference.with_model(model), val, batch_size=256, device=device))


def speedup(scratch: list[tuple[int, float]], inherited: list[tuple[int, float]]) -> float | None:
    """samples scratch needs to reach its final R@1 / samples the inherited run needs for the same R@1."""
    if not scratch or not inherited:
        return None
    goal_samples, goal = scratch[-1]
    prev = (0, float("-inf"))
    for samples, value in inherited:
        if value >= goal:
            if prev[1] == float("-inf"):
                return goal_samples / max(1, samples)
            frac = (goal - prev[1]) / max(1e-9, value - prev[1])  # linear between the two points
            return goal_samples / max(1.0, prev[0] + frac * (samples - prev[0]))
        prev = (samples, value)
    return None


def train_teacher(sc: Scale, work: Path, device: str, deadline: float, data: dict | None = None) -> Path | None:
    """Train the teacher from scratch with the CLIP loss, in pieces; its model directory once finished, None
    when `deadline` came first (running again continues). `data`: the recipe's data settings, if not the
    defaults."""
    tdir = work / "teacher" / TEACHER_STAGE
    if (tdir / "config.json").is_file():
        return tdir
    every = sc.eval_every * 5
    stage = {
        "name": TEACHER_STAGE,
        "method": "scratch",
        "shape": sc.teacher_preset,
        "teacher": "none",
        "losses": {"clip": 1.0},
        "steps": sc.teacher_steps,
        "batch_size": sc.teacher_batch,
        "lr": sc.teacher_lr,
        "warmup": 0.05,
        "checkpoint_every": every,
        "log_every": 20,
    }
    recipe = {
        "name": "b32-teacher",
        "run_dir": str(work / "teacher"),
        "device": device,
        "seed": 0,
        "stages": [stage],
        "eval": {"data": None},
        **({"data": data} if data else {}),
    }
    return tdir if run_in_pieces(recipe, every, deadline) is not None else None


def run_experiment(
    entry: dict[str, Any], stages: list[dict[str, Any]], sc: Scale, teacher: Any, tdir: Path, work: Path, how: Any
) -> bool:
    """One student experiment (`stages`) with its learning curve in `entry`, in pieces; True once finished.
    `how`: device, deadline, save (called whenever `entry` changed) and optionally data (recipe settings)."""
    offsets, total = {}, 0
    for i, st in enumerate(stages):
        st.update(
            {
                "name": f"s{i + 1}",
                "batch_size": sc.batch,
                "lr": sc.lr,
                "losses": {"affinity": 1.0},
                "checkpoint_every": sc.eval_every,
                "log_every": sc.eval_every,
            }
        )
        offsets[st["name"]] = total
        total += st["steps"] * sc.batch

    def point(stage: str, cfg: Any, ckpt: Path) -> None:
        step, value = _checkpoint_r1(ckpt, cfg, teacher, sc.val, how.device)
        masks = cfg.method == "prune" and not stage.endswith(".masks")
        samples = offsets[cfg.name] + (step + (round(cfg.steps * cfg.prune.mask_steps) if masks else 0)) * sc.batch
        if all(p["samples"] != samples for p in entry["curve"]):
            entry["curve"].append({"stage": stage, "samples": samples, "R@1": round(value, 2)})
            how.save()

    key = f"{entry['name']} [seed {entry['seed']}]"
    recipe = {
        "name": _slug(key),
        "teacher": str(tdir),
        "run_dir": str(work / _slug(key)),
        "device": how.device,
        "seed": entry["seed"],
        "stages": stages,
        "eval": {"data": sc.val},
        **({"data": how.data} if getattr(how, "data", None) else {}),
    }
    report = run_in_pieces(recipe, sc.eval_every, how.deadline, point)
    if report is None:
        return False
    final = report["students"][-1]
    entry["curve"] = [p for p in entry["curve"] if p["samples"] != total]
    entry["curve"].append({"stage": "final", "samples": total, "R@1": round(r1(final), 2)})
    entry.update(
        {
            "done": True,
            "R@1": round(r1(final), 2),
            "params": final["params"]["total"],
            "zero_shot_top1": final.get("zero_shot", {}).get("top1"),
            "samples": total,
        }
    )
    how.save()
    return True


def evaluate_teacher(results: dict[str, Any], sc: Scale, tdir: Path, device: str) -> Any:
    """The trained teacher, with its R@1 recorded in `results` once."""
    teacher = load_model_dir(tdir)
    if "teacher" not in results:
        res = evaluate(teacher, sc.val, batch_size=256, device=device)
        results["teacher"] = {
            "params": teacher.model.num_params()["total"],
            "R@1": r1(res),
            "samples": sc.teacher_steps * sc.teacher_batch,
        }
    return teacher


def run_scale(args: Any, out: Path) -> dict[str, Any]:
    sc = SCALES["tiny" if args.tiny else "b32"]
    deadline = time.monotonic() + 60 * args.minutes
    work = out / "compression-b32-runs"
    state_file = out / "compression-b32.json"
    results: dict[str, Any] = read_json(state_file, "results") if state_file.is_file() else {}
    results.setdefault("experiments", {})
    results["meta"] = {
        "scale": "tiny" if args.tiny else "b32",
        "device": args.device,
        **sc.__dict__,
        "seeds": args.seeds,
    }
    tdir = train_teacher(sc, work, args.device, deadline)
    if tdir is None:
        atomic_write_json(state_file, results)
        return {"done": False, "phase": "teacher"}
    teacher = evaluate_teacher(results, sc, tdir, args.device)
    atomic_write_json(state_file, results)
    for seed in range(args.seeds):
        for name, stages in experiments(teacher.shape, sc.steps, sc.small).items():
            key = f"{name} [seed {seed}]"
            entry = results["experiments"].setdefault(key, {"name": name, "seed": seed, "curve": [], "done": False})
            if entry["done"]:
                continue
            how = SimpleNamespace(
                device=args.device, deadline=deadline, save=lambda: atomic_write_json(state_file, results)
            )
            if not run_experiment(entry, stages, sc, teacher, tdir, work, how):
                atomic_write_json(state_file, results)
                return {"done": False, "phase": key}
    results["speedups"] = _speedups(results)
    atomic_write_json(state_file, results)
    return {"done": True, "results": results}


def _curve(entry: dict[str, Any]) -> list[tuple[int, float]]:
    return sorted((p["samples"], p["R@1"]) for p in entry["curve"])


def _speedups(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    exps = results["experiments"]
    for e in exps.values():
        if not e["name"].startswith("scratch") or not e["done"]:
            continue
        pct = e["name"].split()[1]
        for other in exps.values():
            if (
                other["seed"] == e["seed"]
                and other["done"]
                and other["name"].split()[1] == pct
                and other is not e
                and "chain" not in other["name"]
            ):
                s = speedup(_curve(e), _curve(other))
                out.append(
                    {
                        "scratch": e["name"],
                        "inherited": other["name"],
                        "seed": e["seed"],
                        "scratch_final_R@1": e["R@1"],
                        "speedup": None if s is None else round(s, 2),
                    }
                )
    return out


def render(results: dict[str, Any], command: str) -> str:
    meta = results["meta"]
    lines = [f"# TinyCLIP's claims at {meta['scale']} scale (`{command}`)", ""]
    if "teacher" in results:
        t = results["teacher"]
        lines += [
            f"Teacher: {meta['teacher_preset']}, {t['params']:,} parameters, trained from scratch on scenes for "
            f"{t['samples']:,} samples; R@1 {t['R@1']:.1f} on {meta['val']}. Students: {meta['steps']} steps at "
            f"batch {meta['batch']} each (a chain splits them), affinity mimicking; device {meta['device']}.",
            "",
        ]
    rows = ["| experiment | seed | params | final R@1 | curve (samples: R@1) |", "|---|---|---|---|---|"]
    for e in results["experiments"].values():
        curve = ", ".join(f"{p['samples']:,}: {p['R@1']:.1f}" for p in sorted(e["curve"], key=lambda p: p["samples"]))
        rows.append(
            f"| {e['name']} | {e['seed']} | {e.get('params', ''):,} | {e.get('R@1', 'running')} | {curve} |"
            if e["done"]
            else f"| {e['name']} | {e['seed']} | | (not finished) | {curve} |"
        )
    lines += rows + [""]
    if results.get("speedups"):
        lines += [
            "Inheritance speed-up (samples scratch needs for its final R@1 / samples the inherited student "
            "needs for the same; the paper: 1.4-7.8x):",
            "",
            "| scratch | inherited | seed | scratch final R@1 | speed-up |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['scratch']} | {s['inherited']} | {s['seed']} | {s['scratch_final_R@1']} | "
            f"{'not reached' if s['speedup'] is None else str(s['speedup']) + 'x'} |"
            for s in results["speedups"]
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for e in results["experiments"].values():
        c = _curve(e)
        if c:
            ax.plot([x for x, _ in c], [y for _, y in c], marker="o", label=f"{e['name']} (seed {e['seed']})")
    ax.set_xlabel("student samples seen")
    ax.set_ylabel("R@1 (mean of i2t, t2i), %")
    return save_plot(fig, ax, path)


def save_plot(fig: Any, ax: Any, path: Path) -> bool:
    """Legend, grid and layout, then the PNG written under a temporary name and renamed (no half-written plot)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)
