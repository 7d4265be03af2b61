"""How many PyTorch threads a CPU training process should use, idle and under load (issue 17, item 5).

    python benchmarks/cpu_threads.py --out benchmarks/results/cpu-threads [--steps 12] [--conditions idle,loaded]

Times a quick-start-shaped distillation step (the scenes teacher, 4 layers of width 128, teaching a 2-layer
student of the same width with the affinity loss, batch 128, AdamW) in a fresh process per cell, with 1 thread
and with PyTorch's default (one per usable core), on the machine as it is ("idle") and with one spinning process
per core started beside it ("loaded": what a shared CI runner or a second job looks like). Each cell reports the
median seconds per step; the table says which thread count wins where. It is a benchmark, not a test: numbers
depend on the machine and its load, which the JSON records.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyclip_edge.common.threads import busy_cores, usable_cores  # noqa: E402
from tinyclip_edge.runtimes.devices import cpu_facts  # noqa: E402


def _spin(stop: mp.Event) -> None:
    while not stop.is_set():
        pass


def _cell(threads: int, steps: int, queue: mp.Queue) -> None:
    import torch

    from tinyclip_edge.losses.clip import affinity_loss
    from tinyclip_edge.losses.registry import DistillOutputs
    from tinyclip_edge.models import ClipModel
    from tinyclip_edge.models.presets import preset_shape, uniform_shape

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = ClipModel(preset_shape("scenes-teacher")).eval()
    student = ClipModel(uniform_shape(128, 2, 4, embed_dim=128)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    img, ids = torch.randn(128, 3, 32, 32), torch.randint(0, 35, (128, 24))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.no_grad():
            t_img, t_txt, t_scale = teacher(img, ids)
        s_img, s_txt, s_scale = student(img, ids)
        out = DistillOutputs(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
        loss = sum(affinity_loss(out, {"scale": "own"}).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    queue.put({"threads": threads, "s_per_step": statistics.median(times), "steps": steps})


def _measure(threads: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cell, args=(threads, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(conditions: list[str], steps: int) -> dict:
    cores = usable_cores()
    ctx = mp.get_context("spawn")
    rows = []
    for condition in conditions:
        stop, spinners = ctx.Event(), []
        if condition == "loaded":
            spinners = [ctx.Process(target=_spin, args=(stop,)) for _ in range(cores)]
            for p in spinners:
                p.start()
            time.sleep(2)
        for threads in sorted({1, cores}):
            load = busy_cores(1.0) or 0.0  # cores busy with other work right before the cell (spinners or not)
            r = _measure(threads, steps)
            rows.append({"condition": condition, "busy_cores_at_start": round(load, 2), **r})
            print(f"{condition:7s} threads={threads}  {r['s_per_step']:.3f} s/step  (busy {load:.2f})", flush=True)
        stop.set()
        for p in spinners:
            p.join()
    return {"cores": cores, "cpu": cpu_facts()["model"], "torch_default_threads": cores, "rows": rows}


def render(result: dict, command: str) -> str:
    lines = [
        f"# CPU threads per training process: `{command}`",
        "",
        f"{result['cpu']}, {result['cores']} usable cores. Quick-start-shaped distillation step, median s/step.",
        "",
        "| condition | cores busy at start | threads | s/step | vs 1 thread |",
        "|---|---|---|---|---|",
    ]
    base = {r["condition"]: r["s_per_step"] for r in result["rows"] if r["threads"] == 1}
    for r in result["rows"]:
        ratio = r["s_per_step"] / base[r["condition"]]
        lines.append(
            f"| {r['condition']} | {r['busy_cores_at_start']} | {r['threads']} | {r['s_per_step']:.3f} | {ratio:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.md")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--conditions", default="idle,loaded")
    args = ap.parse_args()
    conditions = [c for c in args.conditions.split(",") if c]
    if not conditions or any(c not in ("idle", "loaded") for c in conditions) or args.steps < 1:
        ap.error("--conditions takes idle and/or loaded; --steps must be >= 1")
    result = run(conditions, args.steps)
    command = "python benchmarks/cpu_threads.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    Path(f"{out}.md").write_text(render(result, command))
    print(render(result, command))


if __name__ == "__main__":
    main()
