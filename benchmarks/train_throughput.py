"""Training throughput of a real-size distillation stage, through the project's own runner.

A ViT-B/32-shaped teacher (random weights: speed does not depend on them) is compressed to 50% by
manual inheritance + affinity mimicking on scenes rendered at 224 px: the samples/s the runner logs
include data loading, the frozen teacher's forward pass, and the student's forward/backward.

    python benchmarks/train_throughput.py --device cuda --out DIR [--batch 256 --steps 80]

Writes DIR/train-throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.common.preprocess import Preprocess
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.data import scenes
from tinyclip_edge.models import ClipModel, ClipPackage, save_model_dir
from tinyclip_edge.models.presets import vit_b_32_shape


def _recipe(args: argparse.Namespace, work: Path, shape: Any) -> Any:
    """The packaged ViT-B/32 -> 50% recipe on a random ViT-B/32-shaped teacher and the scenes data."""
    teacher = ClipPackage(
        ClipModel(shape),
        Preprocess.from_dict(scenes.preprocess_config(224)),
        scenes.tokenizer_config(77),
        {"teacher": "ViT-B/32 shape, random weights"},
    )
    tdir = save_model_dir(teacher, work / "teacher-model")
    return load_recipe(
        "vit-b-32-to-50pct",
        [
            f"run_dir={work / 'run'}",
            f"teacher={tdir}",
            f"device={args.device}",
            "data.train=scenes:train",
            f"data.workers={args.workers}",
            "eval.data=null",
            f"stages.0.steps={args.steps}",
            f"stages.0.batch_size={args.batch}",
            "stages.0.log_every=10",
            "stages.0.checkpoint_every=100000",
            f"stages.0.precision={args.precision}",
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    work = args.out / "throughput-run"
    shape = vit_b_32_shape()
    recipe = _recipe(args, work, shape)
    t0 = time.perf_counter()
    run_compress(recipe)
    wall = time.perf_counter() - t0
    logs = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    # samples/s within each logging window, skipping the first (warm-up, autotuning, worker start-up)
    windows = [
        (b["samples"] - a["samples"]) / max(1e-9, b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(logs, logs[1:])
    ]
    if len(windows) > 2:
        steady = statistics.median(windows[1:])
    else:  # too few logging windows (a short run): the last one, or the whole run's rate
        steady = windows[-1] if windows else logs[-1]["samples"] / max(1e-9, logs[-1]["elapsed_s"])
    res = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "teacher_params": shape.params()["total"],
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "workers": args.workers,
        "samples_per_s_by_window": [round(w, 1) for w in windows],
        "samples_per_s_steady": steady,
        "wall_s": round(wall, 1),
    }
    atomic_write_json(args.out / "train-throughput.json", res)
    md = (
        f"# Distillation throughput (`benchmarks/train_throughput.py --device {args.device} --batch {args.batch}`)\n\n"
        f"ViT-B/32-shaped teacher ({res['teacher_params'] / 1e6:.1f} M params) -> 50% student, manual inheritance + "
        f"affinity, scenes at 224 px, {args.workers} data workers, precision {args.precision}, on {res['device']}: "
        f"**{steady:,.0f} samples/s** (median over 10-step windows after the first; whole run {wall:.0f} s for "
        f"{args.steps} steps including start-up).\n"
    )
    atomic_write_text(args.out / "train-throughput.md", md)
    print(md)


if __name__ == "__main__":
    main()
