"""Throughput and MFU of one distillation step, through the real trainer (compress/trainer.py::train_stage).

A ViT-B/32-shaped teacher (preset ``vit-b-32-scenes``: 224 px, 12+12 layers, context 77; random weights,
speed does not depend on them) is distilled into its ~50% student (``shape_for_ratio(teacher, 0.5)``) with
the ``vit-b-32-to-50pct`` recipe's stage settings (affinity loss, AdamW, bf16 autocast on CUDA). Each
configuration is one ``train_stage`` call with its own steps; the configurations vary

- execution: ``eager`` | ``compile`` (``stages.N.compile: true``) | ``cudagraphs`` (compile mode
  ``reduce-overhead``: torch.compile captures CUDA graphs of the forward and backward);
- teacher: ``live`` (the frozen teacher's forward in every step) | ``cached`` (its embeddings computed once
  for every pre-rendered pair; a STAND-IN built here: the teacher-embedding cache of issue 11 landed late in
  this work and reads WebDataset shards only. The stand-in is a module that returns the cached rows of the
  batch the trainer is on, so the trainer's code path is unchanged);
- data: ``render-cpu`` (scenes rendered and normalised on the host in loader processes, the default before
  this change) | ``render-cpu-uint8`` (rendered on the host, normalised on the device: the CUDA default now,
  ``data.normalize_on: auto``) | ``prerendered`` (``data.prerender``: uint8 arrays on the device).

Per configuration: samples/s over the timed steps (wall clock between two device synchronisations, after
warm-up/compilation), model TFLOP/s from the shapes (tinyclip_edge/models/flops.py: teacher forward +
3 × student forward per pair; the cached teacher's forward is not counted because it does not run), MFU =
model FLOP/s over the bf16 dense peak that a large matmul reaches in the same run, the first losses (the
same student init and batches give the same curve in every prerendered configuration, within float
rounding), and a torch.profiler summary of a few more steps that says what bounds the step.

GPU (one run, < 10 min, everything into one folder):
    python benchmarks/throughput.py --device cuda --out DIR [--batch 512 --steps 20]
CPU smoke (CI; tiny shapes, a few steps per configuration, torch.compile through dynamo's eager backend):
    python benchmarks/throughput.py --device cpu --tiny --out DIR

Writes DIR/throughput.json, throughput.md (the exact command in its title), throughput.png and
DIR/profile-<configuration>.txt (torch.profiler's op table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout (the GPU machine) as well as an install
    sys.path.insert(0, str(ROOT))

import torch
from torch import Tensor, nn

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.common.preprocess import Preprocess
from tinyclip_edge.common.tokenizers import tokenizer_from_config
from tinyclip_edge.compress import compiled
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.shapes import shape_for_ratio
from tinyclip_edge.compress.tasks import DistillTask
from tinyclip_edge.compress.trainer import autocast_for, train_stage
from tinyclip_edge.data import open_source
from tinyclip_edge.data import scenes as sc
from tinyclip_edge.data.arrays import PrerenderedBatches, to_device_images
from tinyclip_edge.data.batches import TrainBatches
from tinyclip_edge.losses.registry import parse_losses
from tinyclip_edge.models import ClipModel
from tinyclip_edge.models.flops import distill_step_flops, forward_flops
from tinyclip_edge.models.presets import preset_shape, uniform_shape

# (execution, teacher, data), most informative first: a run cut short still has the key comparisons
CONFIGS = [
    ("eager", "live", "render-cpu"),
    ("eager", "live", "render-cpu-uint8"),
    ("eager", "live", "prerendered"),
    ("eager", "cached", "prerendered"),
    ("compile", "live", "prerendered"),
    ("compile", "cached", "prerendered"),
    ("cudagraphs", "cached", "prerendered"),
    ("cudagraphs", "live", "prerendered"),
]


def name_of(c: tuple[str, str, str]) -> str:
    return "/".join(c)


# ---------------------------------------------------------------------------------------------- peak
def matmul_peak(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Dense matmul FLOP/s measured here: bf16 8192³ on CUDA (the MFU denominator), fp32 on the CPU smoke."""
    n, dtype = (256, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    reps = 3 if tiny else 30
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = time.perf_counter() - t0
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "flops_per_s": 2 * n**3 * reps / dt}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- cached teacher
class CachedTeacher(nn.Module):
    """Stand-in for a teacher-embedding cache: the teacher's normalised embeddings of every pre-rendered pair,
    computed once; call k returns the rows of batch k (``batches.indices(k)``, the trainer's k-th batch)."""

    def __init__(self, teacher: ClipModel, batches: PrerenderedBatches, device: torch.device, chunk: int):
        super().__init__()
        teacher = teacher.to(device).eval()
        img, txt = [], []
        with torch.inference_mode(), autocast_for(device, "auto"):
            for lo in range(0, len(batches.captions), chunk):
                sel = torch.arange(lo, min(lo + chunk, len(batches.captions)), device=batches.images.device)
                i, t, scale = teacher(
                    to_device_images(batches.images[sel], batches.preprocess, device), batches.ids[sel].to(device)
                )
                img.append(i.float())
                txt.append(t.float())
        self.register_buffer("img", torch.cat(img).clone())
        self.register_buffer("txt", torch.cat(txt).clone())
        self.register_buffer("scale", scale.float().clone())
        self.batches, self.calls = batches, 0
        self.shape = teacher.shape  # the trainer reads the teacher's embedding width from it

    @torch.compiler.disable  # a Python counter: compiling it would recompile every step
    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(self.batches.rank_indices(self.calls), device=self.img.device)
        self.calls += 1
        return self.img[idx], self.txt[idx], self.scale


# ---------------------------------------------------------------------------------------------- profile summary
def _dev(e: Any, name: str) -> float:
    for n in (name, name.replace("device", "cuda")):
        v = getattr(e, n, None)
        if v is not None:
            return float(v)
    return 0.0


def summarise_profile(prof: Any, wall_s: float, steps: int, device: torch.device) -> dict[str, Any]:
    """What one step spends its time on, from the profiled steps, and the verdict: data, launch, optimizer
    or kernels. Device time on CUDA is the sum of kernel durations; on the CPU it is the ops' self time."""
    from torch.autograd import DeviceType

    events = prof.events()
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    wall_us = wall_s * 1e6 / steps

    def cpu_in(prefix: str) -> float:
        return sum(e.cpu_time_total for e in cpu if e.name.startswith(prefix)) / steps

    data_us = cpu_in("data: next batch") + cpu_in("data: to device")
    if device.type == "cuda":
        busy_us = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA) / steps
        opt_dev_us = sum(_dev(e, "device_time_total") for e in cpu if e.name.startswith("Optimizer.step")) / steps
        by_op: dict[str, float] = {}
        for e in events:
            if e.device_type == DeviceType.CUDA:
                by_op[e.name] = by_op.get(e.name, 0.0) + e.time_range.elapsed_us() / steps
    else:
        ops = [e for e in cpu if e.name.startswith("aten::")]
        busy_us = sum(e.self_cpu_time_total for e in ops) / steps
        opt_dev_us = cpu_in("Optimizer.step")
        by_op = {}
        for e in ops:
            by_op[e.name] = by_op.get(e.name, 0.0) + e.self_cpu_time_total / steps
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:5]
    share = {
        "data_wait": data_us / wall_us,
        "device_busy": min(1.0, busy_us / wall_us),
        "optimizer": opt_dev_us / max(busy_us, 1e-9),
    }
    where = "GPU" if device.type == "cuda" else "CPU"
    if share["data_wait"] > 0.3:
        verdict = f"data: {share['data_wait']:.0%} of the step waits for batches"
    elif share["device_busy"] < 0.6:
        verdict = f"launch/CPU overhead: the {where} is busy only {share['device_busy']:.0%} of the step"
    elif share["optimizer"] > 0.25:
        verdict = f"optimizer: {share['optimizer']:.0%} of the {where} time"
    else:
        verdict = f"kernels: the {where} is busy {share['device_busy']:.0%} of the step; top: {top[0][0][:60]}"
    return {
        "step_ms": wall_us / 1e3,
        "device_busy_ms": busy_us / 1e3,
        "data_wait_ms": data_us / 1e3,
        "optimizer_ms": opt_dev_us / 1e3,
        "shares": share,
        "verdict": verdict,
        "top_ops": [{"name": n[:120], "ms_per_step": us / 1e3} for n, us in top],
    }


# ---------------------------------------------------------------------------------------------- one configuration
def run_config(cfg: tuple[str, str, str], a: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    execution, teacher_kind, data = cfg
    device = env["device"]
    warm, timed, prof_steps = a.warmup, a.steps, a.profile_steps
    # + a profiler warm-up step, + one trailing step so the final checkpoint's write is not profiled (the tiny
    # smoke run skips both: 3 steps per configuration)
    pw, trail = (0, 0) if a.tiny else (1, 1)
    total = warm + timed + pw + prof_steps + trail
    st = replace(
        env["stage"],
        steps=total,
        batch_size=a.batch,
        compile=execution != "eager",
        compile_mode="reduce-overhead" if execution == "cudagraphs" else "default",
    )
    batches, t_model = _data_and_teacher(data, teacher_kind, a, env)
    torch.manual_seed(0)  # the same student init in every configuration: comparable loss curves
    task = DistillTask(ClipModel(env["student_shape"]))
    marks: dict[str, float] = {}
    t_prof0 = warm + timed + pw

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=warm + timed, warmup=pw, active=prof_steps, repeat=1),
    )

    def on_step(state: Any) -> None:
        if state.step in (warm, warm + timed, t_prof0, t_prof0 + prof_steps):
            sync(device)
            marks[str(state.step)] = time.perf_counter()
        prof.step()

    run_dir = a.work / "work" / name_of(cfg).replace("/", "_")
    t0 = time.perf_counter()
    with prof:
        train_stage(
            task,
            t_model,
            batches,
            st,
            parse_losses(st.losses),
            device=device,
            ckpt_dir=run_dir / "ckpt",
            metrics_path=run_dir / "metrics.jsonl",
            label=name_of(cfg),
            workers=env["workers"],
            on_step=on_step,
        )
    wall = time.perf_counter() - t0
    res = _result(cfg, a, env, prof, marks, run_dir, wall)
    del task, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # each configuration compiles from scratch
    return res


def _data_and_teacher(data: str, teacher_kind: str, a: argparse.Namespace, env: dict[str, Any]) -> tuple[Any, Any]:
    """The configuration's batches (pre-rendered, or rendered on the CPU as float or uint8) and teacher (live, or
    the cached-embedding stand-in)."""
    if data == "prerendered":
        batches = env["pool"]
    else:
        src = open_source("scenes:train", image_size=env["pre"].image_size)
        batches = TrainBatches(src, env["pre"], env["tok"], a.batch, seed=0, uint8=data == "render-cpu-uint8")
    if teacher_kind != "cached":
        return batches, env["teacher"]
    if data != "prerendered":
        raise SystemExit("the cached-teacher stand-in needs prerendered data")
    env["cached"].calls = 0
    return batches, env["cached"]


def _result(
    cfg: tuple[str, str, str],
    a: argparse.Namespace,
    env: dict[str, Any],
    prof: Any,
    marks: dict[str, float],
    run_dir: Path,
    wall: float,
) -> dict[str, Any]:
    """Throughput between the timing marks, MFU against the measured peak, the profile's verdict and losses."""
    execution, teacher_kind, data = cfg
    device, warm, timed, prof_steps = env["device"], a.warmup, a.steps, a.profile_steps
    t_prof0 = warm + timed + (0 if a.tiny else 1)
    dt = marks[str(warm + timed)] - marks[str(warm)]
    sps = a.batch * timed / dt
    flops = distill_step_flops(
        env["student_shape"], env["teacher_shape"], batch=a.batch, cached_teacher=teacher_kind == "cached"
    )
    achieved = flops["per_pair"] * sps
    summary = summarise_profile(prof, marks[str(t_prof0 + prof_steps)] - marks[str(t_prof0)], prof_steps, device)
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=25
    )
    atomic_write_text(a.work / f"profile-{name_of(cfg).replace('/', '_')}.txt", table)
    losses = [json.loads(x)["total"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name_of(cfg),
        "execution": execution,
        "teacher": teacher_kind,
        "data": data,
        "samples_per_s": sps,
        "step_ms": dt / timed * 1e3,
        "model_flops_per_pair": flops["per_pair"],
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / env["peak"]["flops_per_s"],
        "losses": losses,
        "wall_s": wall,
        "profile": summary,
    }


# ---------------------------------------------------------------------------------------------- output
def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    peak = meta["peak"]
    lines = [
        f"# Distillation step throughput (`{meta['command']}`)",
        "",
        (
            f"{meta['teacher']} -> {meta['student']}, batch {meta['batch']}, on {meta['device_name']} "
            f"(torch {meta['torch']}). Model FLOPs per pair: teacher forward {meta['teacher_gflops_pair']:.2f} G + "
            f"3 x student forward {meta['student_gflops_pair']:.2f} G (models/flops.py). MFU denominator: "
            f"{peak['dtype']} {peak['n']}³ matmul measured in this run, {peak['flops_per_s'] / 1e12:.1f} TFLOP/s. "
            f"Samples/s over {meta['steps']} steps after {meta['warmup']} warm-up steps; profile over "
            f"{meta['profile_steps']} more."
        ),
        "",
    ]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    lines += [
        (
            "| configuration | samples/s | step ms | model TFLOP/s | MFU | bound by | data wait | device busy | "
            "optimizer | first losses |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["profile"]
        s = p["shares"]
        lines.append(
            f"| {r['name']} | {r['samples_per_s']:,.0f} | {r['step_ms']:.1f} | {r['model_tflops_per_s']:.2f} | "
            f"{r['mfu']:.1%} | {p['verdict']} | {s['data_wait']:.0%} | {s['device_busy']:.0%} | "
            f"{s['optimizer']:.0%} | {', '.join(f'{x:.4f}' for x in r['losses'][:3])} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(results) + 1.5))
    names = [r["name"] for r in results][::-1]
    vals = [r["samples_per_s"] for r in results][::-1]
    bars = ax.barh(names, vals, color="#4c72b0")
    for b, r in zip(bars, results[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['mfu']:.1%} MFU", va="center", fontsize=8)
    ax.set_xlabel("samples / s (one distillation step)")
    fig.tight_layout()
    with open(path.with_suffix(".tmp.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    os.replace(path.with_suffix(".tmp.png"), path)
    plt.close(fig)
    return None


def shapes_for(tiny: bool) -> tuple[Any, str]:
    """The teacher's shape and label: ViT-B/32-shaped (vit-b-32-scenes), or a tiny one for the CPU smoke runs."""
    if tiny:
        return uniform_shape(64, 2, 2, embed_dim=32), "tiny teacher (64 wide, 2+2 layers, 32 px)"
    return preset_shape(
        "vit-b-32-scenes"
    ), "ViT-B/32-shaped teacher (vit-b-32-scenes: 224 px, 12+12 layers, context 77)"


def build_env(a: argparse.Namespace, device: torch.device, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the configurations share (teacher, pre-rendered pool, cached teacher, measured peak) and the
    report's meta. ``a``: batch, pool, tiny, steps, warmup, profile_steps."""
    teacher_shape, teacher_label = shapes_for(a.tiny)
    student_shape = shape_for_ratio(teacher_shape, 0.5)
    size = teacher_shape.vision.image_size
    pre = Preprocess.from_dict(sc.preprocess_config(size))
    tok = tokenizer_from_config(sc.tokenizer_config(teacher_shape.text.context_length))
    stage = load_recipe(
        "vit-b-32-to-50pct", ["stages.0.log_every=1", "stages.0.checkpoint_every=1000000", "stages.0.warmup=0"]
    ).stages[0]
    torch.manual_seed(1)
    teacher = ClipModel(teacher_shape)
    t0 = time.perf_counter()
    src = open_source("scenes:train", image_size=size)
    pool = PrerenderedBatches(src, pre, tok, a.batch, seed=0, size=a.pool, device=device, workers=workers)
    prerender_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = CachedTeacher(teacher, pool, device, chunk=256)
    cache_s = time.perf_counter() - t0
    peak = matmul_peak(device, a.tiny)
    env = {
        "device": device,
        "teacher": teacher,
        "teacher_shape": teacher_shape,
        "student_shape": student_shape,
        "pre": pre,
        "tok": tok,
        "stage": stage,
        "pool": pool,
        "cached": cached,
        "workers": workers,
        "peak": peak,
    }
    meta = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "teacher": teacher_label,
        "student": f"~50% student ({student_shape.params()['total'] / 1e6:.2f} M of "
        f"{teacher_shape.params()['total'] / 1e6:.2f} M params)",
        "teacher_gflops_pair": forward_flops(teacher_shape)["pair"] / 1e9,
        "student_gflops_pair": forward_flops(student_shape)["pair"] / 1e9,
        **{k: getattr(a, k) for k in ("batch", "steps", "warmup", "profile_steps")},
        "workers": workers,
        "peak": peak,
        "prerender": {"pairs": len(pool.captions), "seconds": prerender_s, "bytes": pool.bytes},
        "teacher_cache_seconds": cache_s,
        "tiny": a.tiny,
    }
    return env, meta


def prepare(a: argparse.Namespace) -> tuple[torch.device, int, list[str]]:
    """Device checks and settings shared with benchmarks/gpu_run.py: (device, loader workers, notes)."""
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible (use --device cpu --tiny for the smoke run)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tiny = a.tiny
    workers = a.workers if a.workers is not None else (0 if tiny else max(0, min(14, (os.cpu_count() or 2) - 2)))
    notes = [
        (
            "cached teacher: a stand-in built inside this benchmark (the teacher's embeddings of every "
            "pre-rendered pair, computed once). The toolkit's own cache (stages.N.teacher_cache, from `data "
            "cache-teacher`) reads WebDataset shards only, and this benchmark trains on pre-rendered scenes"
        )
    ]
    if tiny:
        compiled.COMPILE_BACKEND = "eager"
        notes.append(
            "--tiny: tiny shapes on the CPU; torch.compile runs dynamo with its eager backend (no inductor "
            "code generation) and CUDA graphs do not exist on a CPU: the wiring is exercised, the numbers "
            "mean nothing"
        )
    return device, workers, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (the CPU smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="default 512 (cuda), 8 (tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration; default 20 (tiny 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation); default 6 (tiny 1)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps; default 3 (tiny 1)")
    ap.add_argument(
        "--workers", type=int, default=None, help="loader processes for render-cpu; default cores-2, max 14"
    )
    ap.add_argument("--pool", type=int, default=None, help="pairs to pre-render; default 4096 (tiny 32)")
    ap.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    a = ap.parse_args(argv)
    step_defaults(a)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work = a.out
    chosen = CONFIGS if not a.configs else [c for c in CONFIGS if name_of(c) in a.configs.split(",")]
    if a.configs and len(chosen) != len(a.configs.split(",")):
        raise SystemExit(f"unknown configuration in --configs; choose from {', '.join(map(name_of, CONFIGS))}")
    device, workers, notes = prepare(a)
    env, meta = build_env(a, device, workers)
    meta["command"] = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta["notes"] = notes
    results: list[dict[str, Any]] = []
    for cfg in chosen:
        print(f"== {name_of(cfg)}", flush=True)
        results.append(run_config(cfg, a, env))
        r = results[-1]
        print(f"   {r['samples_per_s']:,.1f} samples/s, MFU {r['mfu']:.1%}, {r['profile']['verdict']}", flush=True)
        # written after every configuration: a run cut short keeps what it measured
        atomic_write_json(a.out / "throughput.json", {"meta": meta, "results": results})
        atomic_write_text(a.out / "throughput.md", render(results, meta))
    note = plot(results, a.out / "throughput.png")
    if note:
        meta["notes"].append(note)
        atomic_write_json(a.out / "throughput.json", {"meta": meta, "results": results})
    md = render(results, meta)
    atomic_write_text(a.out / "throughput.md", md)
    print(md)
    bad = [r["name"] for r in results if not all(math.isfinite(v) for v in (r["samples_per_s"], r["mfu"]))]
    if bad:
        raise SystemExit(f"non-finite results for {bad}")


def step_defaults(a: argparse.Namespace) -> None:
    """Fill the unset step counts, batch and pool size: the GPU defaults, or the tiny smoke run's."""
    tiny = a.tiny
    a.batch = a.batch or (8 if tiny else 512)
    a.steps = a.steps or (1 if tiny else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 6)
    a.profile_steps = a.profile_steps or (1 if tiny else 3)
    a.pool = a.pool or (32 if tiny else 4096)


if __name__ == "__main__":
    main()
