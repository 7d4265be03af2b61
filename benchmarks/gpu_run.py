"""Every GPU measurement of the project in one call that fits a GPU loan (issue 22): in this order, as much
as ``--budget-s`` allows,

a. distillation-step throughput and MFU (benchmarks/throughput.py: a ViT-B/32-shaped teacher -> its 50%
   student, batch 512, pre-rendered data): eager / torch.compile / CUDA graphs x live / cached teacher, the
   bf16 peak measured by a large matmul in the same run, and a profiler verdict per configuration;
b. latency of the ViT-B/32 teacher and its 50/25/10% students (benchmarks/latency.py's models and
   teacher/student ratios beside the FLOP ratios): fp16 and bf16, eager / compiled / CUDA graphs, batch 1 and 64;
c. the inheritance speed-up at ViT-B/32 scale (benchmarks/scale_b32.py): a vit-b-32-scenes teacher trained
   from scratch, then its 50% student inherited vs from scratch, with learning curves, sized to what is left.

The budget: part a may run until 55% of it is spent, part b until 80%, part c until the end less a reserve
for the final writes. Before each configuration the script compares an estimate of its cost (a prior guess,
replaced by the measured time of the last configuration of the same kind) with the time its part has left,
and records it as skipped, with the reason, when it would not fit. A configuration that fails is recorded
with its error and the run goes on. Everything lands in DIR as at most 6 files, rewritten atomically after
every configuration so a timeout loses nothing: gpu_run.json, gpu_run.md, throughput.png, inheritance.png.
Scratch files (checkpoints, profiler tables) go to a temporary folder that is removed at the end.

GPU (one call; see docs/THROUGHPUT.md for the offline wheel install):
    timeout 560 python benchmarks/gpu_run.py --out DIR --budget-s 540
CPU smoke (CI): tiny shapes, a few steps, torch.compile through dynamo's eager backend, no CUDA graphs:
    python benchmarks/gpu_run.py --device cpu --tiny --out DIR --budget-s 60
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):  # runnable from a plain checkout (the GPU machine) as well as an install
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gpu_parts

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text

PARTS = ("a", "b", "c")
UNTIL = {"a": 0.55, "b": 0.8, "c": 1.0}  # the share of the budget spent when each part must stop
RESERVE_S = {"gpu": 15.0, "tiny": 2.0}  # kept back for the last writes and plots


class Budget:
    """Seconds left of ``--budget-s``, per part, and the estimates that decide what still fits."""

    def __init__(self, seconds: float, reserve: float, priors: dict[str, float]):
        self.t0, self.seconds, self.reserve = time.monotonic(), seconds, reserve
        self.priors, self.measured = dict(priors), {}

    def spent(self) -> float:
        return time.monotonic() - self.t0

    def left(self, part: str) -> float:
        limit = self.seconds * UNTIL[part] - (self.reserve if part == PARTS[-1] else 0.0)
        return limit - self.spent()

    def estimate(self, kind: str) -> float:
        return self.measured.get(kind, self.priors[kind])

    def refusal(self, part: str, kind: str, extra: float = 0.0) -> str | None:
        """Why a configuration of `kind` (plus `extra` seconds of set-up) does not fit, or None when it does."""
        need, left = self.estimate(kind) + extra, self.left(part)
        if need <= left:
            return None
        source = "measured" if kind in self.measured else "estimated"
        return f"budget: {source} {need:.0f} s needed, {max(0.0, left):.0f} s left for part {part}"

    def timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        """Run `fn`, remember how long a `kind` took (the next one's estimate)."""
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.measured[kind] = time.monotonic() - t0


class Output:
    """The run's JSON and Markdown, rewritten atomically whenever a configuration ends."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "parts": {}}

    def part(self, name: str) -> dict[str, Any]:
        return self.data["parts"].setdefault(name, {"status": "running", "items": []})

    def save(self) -> None:
        self.data["meta"]["wall_s"] = round(time.monotonic() - self.data["meta"]["_t0"], 1)
        atomic_write_json(self.out / "gpu_run.json", {**self.data, "meta": _public(self.data["meta"])})
        atomic_write_text(self.out / "gpu_run.md", gpu_parts.render(self.data))


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def run_item(out: Output, part: str, item: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> bool:
    """Measure one configuration into `item` (appended to its part), saving after it; False if it failed."""
    item["status"], t0 = "running", time.monotonic()
    out.part(part)["items"].append(item)
    try:
        item.update(fn())
        item["status"] = "measured"
    except gpu_parts.OutOfTime as e:  # a piece of part c met its deadline: its share was too small
        item.update(status="skipped", reason=f"budget: {e}")
    except Exception as e:  # a GPU loan is one call: record the failure and go on with the rest
        item.update(status="failed", error=f"{type(e).__name__}: {e}"[:800])
        traceback.print_exc()
    item["seconds"] = round(time.monotonic() - t0, 2)
    out.save()
    return item["status"] == "measured"


def skip_item(out: Output, part: str, item: dict[str, Any], reason: str) -> None:
    item.update(status="skipped", reason=reason)
    print(f"   skipped {item.get('name')}: {reason}", flush=True)
    out.part(part)["items"].append(item)
    out.save()


def finish_part(out: Output, part: str, note: str | None = None) -> None:
    p = out.part(part)
    states = {i["status"] for i in p["items"]}
    p["status"] = "done" if states == {"measured"} else "skipped" if "measured" not in states else "partial"
    if note:
        p.setdefault("notes", []).append(note)
    out.save()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the (at most 6) result files")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything (default 540)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (the CPU smoke test)")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated parts to run (default a,b,c)")
    a = ap.parse_args(argv)
    if a.device == "cpu" and not a.tiny:
        ap.error("--device cpu measures nothing useful at ViT-B/32 scale; add --tiny for the smoke run")
    a.parts = [p for p in a.parts.split(",") if p]
    if not a.parts or any(p not in PARTS for p in a.parts):
        ap.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}")
    if a.budget_s <= 0:
        ap.error("--budget-s must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    scale = "tiny" if a.tiny else "gpu"
    facts = gpu_parts.machine(a.device)  # imports torch: before the clock starts (`timeout` leaves room for it)
    budget = Budget(a.budget_s, RESERVE_S[scale], gpu_parts.PRIORS[scale])
    meta = {
        "_t0": budget.t0,
        "command": "python benchmarks/gpu_run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget_s": a.budget_s,
        "until": UNTIL,
        "estimates_prior_s": gpu_parts.PRIORS[scale],
        **facts,
        "tiny": a.tiny,
    }
    out = Output(a.out, meta)
    out.save()
    work = Path(tempfile.mkdtemp(prefix="tce-gpu-run-"))
    steps = {"a": gpu_parts.part_a, "b": gpu_parts.part_b, "c": gpu_parts.part_c}
    try:
        for name in PARTS:
            if name not in a.parts:
                continue
            print(f"== part {name} ({budget.left(name):.0f} s left for it)", flush=True)
            try:
                steps[name](a, budget, out, work)
            except Exception as e:  # outside any one configuration (set-up): the next part still runs
                traceback.print_exc()
                out.part(name)["items"].append({"name": f"part {name}", "status": "failed", "error": f"{e!r}"[:800]})
            finish_part(out, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our own temporary folder: checkpoints and profiler tables
        out.save()
    failed = [i.get("name") for p in out.data["parts"].values() for i in p["items"] if i["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(map(str, failed))} (errors in gpu_run.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
