"""The three parts of benchmarks/gpu_run.py, each built from the benchmark that owns the measurement
(throughput.py, latency.py, scale_b32.py), and the Markdown they are reported in."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Prior estimates in seconds, before anything of a kind was measured in the run (then the measured time of
# the last one is used). GPU: guesses for an H100/H200 (inductor compiles of a ViT-B/32 take tens of seconds);
# they decide what is attempted, nothing in the report is computed from them.
PRIORS = {
    "gpu": {
        "a:setup": 30.0,
        "a:eager": 20.0,
        "a:compile": 75.0,
        "a:cudagraphs": 75.0,
        "b:eager": 5.0,
        "b:cudagraph": 8.0,
        "b:compile": 45.0,
        "c:min": 90.0,
        "c:teacher_step": 0.4,
        "c:student_step": 0.2,
        "c:eval": 4.0,
        "c:overhead": 10.0,
    },
    "tiny": {
        "a:setup": 3.0,
        "a:eager": 3.0,
        "a:compile": 5.0,
        "a:cudagraphs": 5.0,
        "b:eager": 2.0,
        "b:cudagraph": 2.0,
        "b:compile": 3.0,
        "c:min": 10.0,
        "c:teacher_step": 0.3,
        "c:student_step": 0.3,
        "c:eval": 1.0,
        "c:overhead": 3.0,
    },
}


class OutOfTime(Exception):
    """A piece of part c reached its deadline before it finished (its checkpoints are kept, not its result)."""


def machine(device: str) -> dict[str, Any]:
    import torch

    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "CPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------- part a
def part_a(a: argparse.Namespace, budget: Any, out: Any, work: Path) -> None:
    """Distillation-step throughput and MFU, eager / compile / CUDA graphs x live / cached teacher."""
    import throughput as tp
    from gpu_run import run_item, skip_item

    ns = argparse.Namespace(device=a.device, tiny=a.tiny, workers=None, work=work / "a")
    ns.batch = ns.steps = ns.warmup = ns.profile_steps = ns.pool = None
    tp.step_defaults(ns)
    ns.work.mkdir(parents=True)
    configs = [c for c in tp.CONFIGS if c[2] == "prerendered"]  # the six, most informative first
    why = budget.refusal("a", "a:setup", extra=budget.estimate(f"a:{configs[0][0]}"))
    if why:
        for c in configs:
            skip_item(out, "a", {"name": tp.name_of(c)}, why)
        return
    device, workers, notes = tp.prepare(ns)
    env, meta = budget.timed("a:setup", lambda: tp.build_env(ns, device, workers))
    out.part("a")["meta"] = {**meta, "notes": notes, "command": out.data["meta"]["command"]}
    for cfg in configs:
        kind, item = f"a:{cfg[0]}", {"name": tp.name_of(cfg)}
        why = budget.refusal("a", kind)
        if why:
            skip_item(out, "a", item, why)
            continue
        print(f"   {item['name']}", flush=True)
        run_item(out, "a", item, lambda cfg=cfg, kind=kind: budget.timed(kind, lambda: tp.run_config(cfg, ns, env)))
    measured = [i for i in out.part("a")["items"] if i["status"] == "measured"]
    if measured:
        note = tp.plot(measured, a.out / "throughput.png")
        if note:
            out.part("a")["meta"]["notes"].append(note)
    env.clear()  # the teacher, the pool on the device and the cached embeddings
    _free()


def _free() -> None:
    """Compiled graphs and cached GPU blocks of what the caller has just dropped, handed back."""
    import torch

    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- part b
LATENCY_MODES = ("eager", "cudagraph", "compile")  # the cheap ones first: compiling costs the most


def part_b(a: argparse.Namespace, budget: Any, out: Any, work: Path) -> None:
    """Latency of the teacher and its students per precision and mode, with the FLOP-ratio comparison."""
    import latency as lat
    from gpu_run import run_item, skip_item

    lat.TINY = a.tiny
    lat.vit_b32_shape.cache_clear()
    ratios = [0.5, 0.25] if a.tiny else [0.5, 0.25, 0.1]
    how = SimpleNamespace(
        device=a.device,
        batches=(1, 4) if a.tiny else (1, 64),
        iters=2 if a.tiny else 100,
        warmup=1 if a.tiny else 10,
        compile_backend="eager" if a.tiny else "inductor",
    )
    part = out.part("b")
    part["meta"] = {"teacher": _teacher_source(lat, part), "ratios": ratios, **vars(how)}
    models = dict(lat.models(ratios))
    for mode in LATENCY_MODES:
        for prec in ("fp16", "bf16"):
            for name, model in models.items():
                kind, item = f"b:{mode}", {"name": f"{name} {mode} {prec}", "model": name}
                item.update(mode=mode, precision=prec)
                why = budget.refusal("b", kind)
                if mode == "cudagraph" and a.device != "cuda":
                    why = "CUDA graphs need a CUDA device"
                if why:
                    skip_item(out, "b", item, why)
                    continue
                print(f"   {item['name']}", flush=True)
                run_item(out, "b", item, lambda m=model, i=item, k=kind: budget.timed(k, lambda: _latency(m, i, how)))
                rows = [r for i in part["items"] if i["status"] == "measured" for r in i["rows"]]
                part["ratio_table"], part["ratios"] = lat.ratio_table(SimpleNamespace(rows=rows), ratios)
    del models
    _free()


def _teacher_source(lat: Any, part: dict[str, Any]) -> str:
    """latency.py's label for the teacher's shape; when open_clip is carried but cannot build ViT-B-32 on this
    machine (say, beside an older timm), the shape written in code is used and the reason noted."""
    try:
        return lat.vit_b32_shape()[1]
    except Exception as e:
        sys.modules["open_clip"] = None  # type: ignore[assignment]  # later look-ups: ImportError, the fallback
        part.setdefault("notes", []).append(f"open_clip did not build ViT-B-32 here: {type(e).__name__}: {e}")
        return lat.vit_b32_shape()[1]


def _latency(model: Any, item: dict[str, Any], how: Any) -> dict[str, Any]:
    """p50 latency of both towers at every batch for one model, precision and mode (runtimes/bench.py)."""
    from tinyclip_edge.runtimes import open_runtime
    from tinyclip_edge.runtimes.bench import run_bench

    label, mode, rows = f"{item['model']} {item['mode']} {item['precision']}", item["mode"], []
    # a CUDA graph is captured for one batch size: one runtime per batch; the others serve every batch
    groups = [(b,) for b in how.batches] if mode == "cudagraph" else [tuple(how.batches)]
    for batches in groups:
        opts = {"batch": batches[0]} if mode == "cudagraph" else {}
        if mode == "compile":
            opts["compile_backend"] = how.compile_backend
        rt = open_runtime(model, backend="pyt", device=how.device, precision=item["precision"], mode=mode, **opts)
        rt.name = label
        report = run_bench(
            [rt], batches=batches, tower="both", device=how.device, iters=how.iters, warmup=how.warmup, progress=False
        )
        rows += [{k: r[k] for k in ("artifact", "tower", "batch", "p50_ms", "mean_ms", "p90_ms")} for r in report.rows]
        rt.close()
    _free()
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- part c
def c_scale(a: argparse.Namespace, budget: Any, out: Any, left: float) -> Any:
    """scale_b32's Scale sized to `left` seconds: 40% for the teacher, 30% for each student; None if too little.
    Step times come from part a's eager live-teacher step when it ran (same shapes), else from the priors."""
    import scale_b32 as sb

    if a.tiny:
        return sb.Scale("scenes-tiny", 4, 16, 3e-3, 4, 8, 1e-3, 2, "scenes:val:30", 0.3)
    if left < budget.estimate("c:min"):
        return None
    t_step, s_step = budget.estimate("c:teacher_step"), budget.estimate("c:student_step")
    part_a = out.data["parts"].get("a", {"items": []})
    a_items = {i["name"]: i for i in part_a["items"] if i["status"] == "measured"}
    if "eager/live/prerendered" in a_items:
        step_s = a_items["eager/live/prerendered"]["step_ms"] / 1e3  # batch 512, teacher fwd + 3 x student fwd
        m = part_a["meta"]
        t_step = step_s * 3 * m["teacher_gflops_pair"] / (m["teacher_gflops_pair"] + 3 * m["student_gflops_pair"])
        s_step = step_s * 256 / 512
        t_step, s_step = 1.5 * t_step, 1.5 * s_step  # the runner renders its batches on the host: slower
    fixed = budget.estimate("c:overhead") + 5 * budget.estimate("c:eval")
    t_steps = int((0.4 * left - budget.estimate("c:overhead")) / t_step)
    s_steps = int((0.3 * left - fixed) / s_step) // 4 * 4
    if t_steps < 20 or s_steps < 8:
        return None
    base = sb.SCALES["b32"]
    return dataclasses.replace(
        base,
        teacher_steps=min(t_steps, base.teacher_steps),
        steps=s_steps,
        eval_every=s_steps // 4,
        val="scenes:val:500",
    )


def part_c(a: argparse.Namespace, budget: Any, out: Any, work: Path) -> None:
    """The inheritance speed-up: a teacher from scratch, then 50% inherited vs 50% from scratch, with curves."""
    import scale_b32 as sb
    from gpu_run import run_item, skip_item

    left = budget.left("c")
    sc = c_scale(a, budget, out, left)
    names = ["teacher (vit-b-32-scenes, from scratch)", "manual 50%", "scratch 50%"]
    if sc is None or left < budget.estimate("c:min"):
        for n in names:
            skip_item(
                out,
                "c",
                {"name": n},
                f"budget: {max(0.0, left):.0f} s left for part c, too little for a teacher and two students",
            )
        return
    part = out.part("c")
    res = part["results"] = {"meta": {"scale": "b32 (sized to the budget)", "device": a.device, **vars(sc), "seeds": 1}}
    res["experiments"] = {}
    t_end, device, cwork = time.monotonic() + 0.4 * left, a.device, work / "c"
    # the runner renders scenes in loader processes: all but two of the GPU machine's cores (it has 16)
    data = None if a.tiny else {"workers": max(0, min(14, (os.cpu_count() or 2) - 2))}
    got: dict[str, Any] = {}

    def teacher() -> dict[str, Any]:
        got["dir"] = sb.train_teacher(sc, cwork, device, t_end, data)
        if got["dir"] is None:
            raise OutOfTime(f"the teacher's {sc.teacher_steps} steps did not finish in {0.4 * left:.0f} s")
        got["model"] = sb.evaluate_teacher(res, sc, got["dir"], device)
        return dict(res["teacher"])

    if not run_item(out, "c", {"name": names[0]}, teacher):
        for n in names[1:]:
            skip_item(out, "c", {"name": n}, "no teacher")
        return
    t_model, tdir = got["model"], got["dir"]
    plan = sb.experiments(t_model.shape, sc.steps, sc.small)
    for n in names[1:]:
        entry = res["experiments"].setdefault(n, {"name": n, "seed": 0, "curve": [], "done": False})
        how = SimpleNamespace(device=device, deadline=time.monotonic() + 0.3 * left, save=out.save, data=data)

        def student(n: str = n, entry: dict = entry, how: Any = how) -> dict[str, Any]:
            if not sb.run_experiment(entry, plan[n], sc, t_model, tdir, cwork, how):
                raise OutOfTime(f"{n}: {sc.steps} steps did not finish in {0.3 * left:.0f} s")
            return {k: entry[k] for k in ("R@1", "params", "samples")}

        run_item(out, "c", {"name": n}, student)
    res["speedups"] = sb._speedups(res)
    sb.plot(res, a.out / "inheritance.png")


# ---------------------------------------------------------------------------------------------- report
TITLES = {
    "a": "a. Distillation-step throughput and MFU",
    "b": "b. Latency: ViT-B/32 teacher vs 50/25/10% students",
    "c": "c. Inheritance speed-up at ViT-B/32 scale",
}


def render(data: dict[str, Any]) -> str:
    m = data["meta"]
    lines = [
        f"# GPU measurements (`{m['command']}`)",
        "",
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, Python {m['python']}; budget {m['budget_s']:.0f} s, "
        f"{m.get('wall_s', 0):.0f} s used. Every number below was measured in this run; configurations that "
        "did not fit the budget or failed are listed with the reason.",
        "",
    ]
    for name, part in data["parts"].items():
        lines += [f"## {TITLES[name]} ({part['status']})", ""]
        lines += _RENDER[name](part, m["command"]) + [""]
        lines += [
            f"- {i['name']}: {i['status']}: {i.get('reason') or i.get('error')}"
            for i in part["items"]
            if i["status"] != "measured"
        ]
        lines += [f"- {n}" for n in part.get("notes", [])] + [""]
    return "\n".join(lines) + "\n"


def _demote(md: str) -> list[str]:
    """A benchmark's own Markdown under this report's headings: its title dropped, its headings one deeper."""
    body = md.splitlines()[1:]
    return ["#" + x if x.startswith("#") else x for x in body]


def _render_a(part: dict[str, Any], command: str) -> list[str]:
    import throughput as tp

    measured = [i for i in part["items"] if i["status"] == "measured"]
    if not measured or "meta" not in part:
        return []
    return _demote(tp.render(measured, part["meta"]))


def _render_b(part: dict[str, Any], command: str) -> list[str]:
    rows = [(i, r) for i in part["items"] if i["status"] == "measured" for r in i["rows"]]
    if not rows:
        return []
    cols = sorted({(r["tower"], r["batch"]) for _, r in rows})
    lines = [
        "p50 latency in ms (runtimes/bench.py; CUDA-event timing on a GPU).",
        "",
        "| model | mode | precision | " + " | ".join(f"{t} b{b}" for t, b in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for i in part["items"]:
        if i["status"] == "measured":
            p50 = {(r["tower"], r["batch"]): r["p50_ms"] for r in i["rows"]}
            cells = [f"{p50[c]:.3f}" if c in p50 else "" for c in cols]
            lines.append(f"| {i['model']} | {i['mode']} | {i['precision']} | " + " | ".join(cells) + " |")
    lines += ["", "Teacher/student latency ratio beside the FLOP ratio (models/flops.py):", ""]
    return lines + [part.get("ratio_table", ""), ""]


def _render_c(part: dict[str, Any], command: str) -> list[str]:
    import scale_b32 as sb

    res = part.get("results")
    return _demote(sb.render(res, command)) if res and res.get("experiments") is not None else []


_RENDER = {"a": _render_a, "b": _render_b, "c": _render_c}
