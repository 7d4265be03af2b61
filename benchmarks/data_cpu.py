"""What the host side of a distillation step costs on the CPU: scene generation and rendering per sample at
32 and 224 px, host normalisation vs uint8 batches, pre-rendering, DataLoader overhead, and the frozen
teacher's forward under ``torch.inference_mode`` vs ``torch.no_grad``.

    python benchmarks/data_cpu.py --out benchmarks/results [--reps 3] [--tiny]

Every timing is the median of ``--reps`` repetitions (perf_counter); variants compared with each other run
interleaved, so a noisy neighbour hits them alike. Writes OUT/data-cpu.json and OUT/data-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.common.preprocess import Preprocess
from tinyclip_edge.common.tokenizers import tokenizer_from_config
from tinyclip_edge.data import open_source
from tinyclip_edge.data import scenes as sc
from tinyclip_edge.data.arrays import PrerenderedBatches, to_device_images
from tinyclip_edge.data.batches import TrainBatches, batch_loader
from tinyclip_edge.models import ClipModel
from tinyclip_edge.models.presets import preset_shape


def timed(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, run interleaved (rotating the order every round)."""
    names = list(fns)
    for n in names:  # warm-up
        fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="few samples (the CI smoke test)")
    a = ap.parse_args(argv)
    n = 8 if a.tiny else 64  # samples per timed call
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    res: dict[str, Any] = {
        "command": "python benchmarks/data_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "samples_per_call": n,
    }
    rows: list[tuple[str, str, str]] = []  # (what, value, note)
    for part in (_scenes, _loader_batches, _prerender, _workers, _teacher_forward):
        part(res, rows, n, a)
    _write(res, rows, a)


def _scenes(res: dict[str, Any], rows: list[tuple[str, str, str]], n: int, a: argparse.Namespace) -> None:
    # ---- scenes: generation (Python) and rendering (PIL), per sample
    for size in (32, 224):
        t = timed(
            {
                "make_scene": lambda: [sc.make_scene(0, i) for i in range(n)],
                "make+render": lambda size=size: [sc.render(sc.make_scene(0, i), size) for i in range(n)],
            },
            a.reps,
        )
        res[f"scene_ms_{size}"] = {
            "make_scene": t["make_scene"] / n * 1e3,
            "make_and_render": t["make+render"] / n * 1e3,
        }
        rows.append(
            (
                f"scene generation + rendering, {size} px",
                f"{t['make+render'] / n * 1e3:.2f} ms/sample",
                f"of which generating the scene (no pixels): {t['make_scene'] / n * 1e3:.3f} ms",
            )
        )


def _loader_batches(res: dict[str, Any], rows: list[tuple[str, str, str]], n: int, a: argparse.Namespace) -> None:
    # ---- a whole batch as the loader builds it: host float normalisation vs uint8 (normalised on the device)
    for size in (32, 224):
        pre = Preprocess.from_dict(sc.preprocess_config(size))
        tok = tokenizer_from_config(sc.tokenizer_config(77 if size == 224 else 24))
        src = open_source("scenes:train", image_size=size)
        host = TrainBatches(src, pre, tok, n, seed=0)
        raw = TrainBatches(src, pre, tok, n, seed=0, uint8=True)
        t = timed({"float": lambda host=host: host[0], "uint8": lambda raw=raw: raw[0]}, a.reps)
        # the normalisation alone, on already rendered pixels: numpy per image (what a loader process does on
        # the host path) vs one torch op on the whole uint8 batch (what the device does, here on the CPU)
        pixels = raw[0]["images"]
        arrays = list(pixels.numpy())
        tn = timed(
            {
                "host numpy": lambda pre=pre, arrays=arrays: np.stack([pre.normalize(x) for x in arrays]),
                "torch batch": lambda pre=pre, px=pixels: to_device_images(px, pre, torch.device("cpu")),
            },
            a.reps,
        )
        res[f"batch_ms_per_sample_{size}"] = {k: v / n * 1e3 for k, v in t.items()}
        res[f"normalise_ms_per_sample_{size}"] = {k: v / n * 1e3 for k, v in tn.items()}
        b = host[0]["images"]
        res[f"bytes_per_sample_{size}"] = {"float32": b[0].numel() * 4, "uint8": b[0].numel()}
        rows.append(
            (
                f"loader batch of {n}, {size} px: host-normalised float32",
                f"{t['float'] / n * 1e3:.2f} ms/sample",
                f"{b[0].numel() * 4 / 1024:.0f} KiB/sample to copy",
            )
        )
        rows.append(
            (
                f"loader batch of {n}, {size} px: uint8 (normalised on the device)",
                f"{t['uint8'] / n * 1e3:.2f} ms/sample",
                f"{b[0].numel() / 1024:.0f} KiB/sample to copy",
            )
        )
        rows.append(
            (
                f"normalising {size}-px pixels alone: numpy per image (host path) vs torch on the uint8 batch",
                f"{tn['host numpy'] / n * 1e3:.3f} vs {tn['torch batch'] / n * 1e3:.3f} ms/sample",
                "the torch op runs on the GPU in training; here it runs on this CPU",
            )
        )


def _prerender(res: dict[str, Any], rows: list[tuple[str, str, str]], n: int, a: argparse.Namespace) -> None:
    # ---- pre-rendering N pairs once, and a batch from the pre-rendered arrays
    size = 224
    pre = Preprocess.from_dict(sc.preprocess_config(size))
    tok = tokenizer_from_config(sc.tokenizer_config(77))
    src = open_source("scenes:train", image_size=size)
    pool_n = 2 * n
    t0 = time.perf_counter()
    pool = PrerenderedBatches(src, pre, tok, n, seed=0, size=pool_n, workers=0, chunk=32)
    pre_s = time.perf_counter() - t0
    gathers = []
    for _ in range(20):  # single gathers swing from 0.6 to 1000 ms on the loaded machine: median and minimum
        t0 = time.perf_counter()
        pool[3]
        gathers.append(time.perf_counter() - t0)
    t = {"gather": statistics.median(gathers)}
    res["prerender_224"] = {
        "pairs": pool_n,
        "seconds": pre_s,
        "ms_per_pair": pre_s / pool_n * 1e3,
        "batch_gather_ms": t["gather"] * 1e3,
        "batch_gather_min_ms": min(gathers) * 1e3,
        "bytes": pool.bytes,
    }
    rows.append(
        (
            f"pre-rendering {pool_n} pairs at 224 px (1 process)",
            f"{pre_s / pool_n * 1e3:.2f} ms/pair",
            f"{pool.bytes / pool_n / 1024:.0f} KiB/pair held",
        )
    )
    rows.append(
        (
            f"a batch of {n} from the pre-rendered arrays (CPU tensor gather; median of 20)",
            f"{t['gather'] * 1e3:.2f} ms",
            (f"minimum {min(gathers) * 1e3:.2f} ms; on CUDA the arrays and the gather are on the GPU"),
        )
    )


def _workers(res: dict[str, Any], rows: list[tuple[str, str, str]], n: int, a: argparse.Namespace) -> None:
    # ---- DataLoader overhead: the same batches with 0 and 2 worker processes (start-up included)
    small = TrainBatches(
        open_source("scenes:train", image_size=32),
        Preprocess.from_dict(sc.preprocess_config(32)),
        tokenizer_from_config(sc.tokenizer_config(24)),
        n,
        seed=0,
    )
    steps = 4 if a.tiny else 16
    t = timed({f"workers={w}": (lambda w=w: list(batch_loader(small, 0, steps, w))) for w in (0, 2)}, a.reps)
    res["loader_32px"] = {k: v / (steps * n) * 1e3 for k, v in t.items()} | {"batches": steps}
    for k, v in t.items():
        rows.append(
            (
                f"{steps} batches of {n} at 32 px through batch_loader, {k}",
                f"{v / (steps * n) * 1e3:.2f} ms/sample",
                "start-up of the worker processes included" if k != "workers=0" else "in the main process",
            )
        )


def _teacher_forward(res: dict[str, Any], rows: list[tuple[str, str, str]], n: int, a: argparse.Namespace) -> None:
    # ---- the frozen teacher's forward: inference_mode vs no_grad (1 thread: two threads on a loaded 2-core
    # machine made the comparison swing either way by 20-50% between runs)
    torch.set_num_threads(1)
    for preset, batch in (("scenes-teacher", 16 if not a.tiny else 8), ("vit-b-32-scenes", 1)):
        shape = preset_shape(preset)
        torch.manual_seed(0)
        model = ClipModel(shape).eval().requires_grad_(False)
        img = torch.randn(batch, 3, shape.vision.image_size, shape.vision.image_size)
        ids = torch.randint(0, shape.text.vocab_size, (batch, shape.text.context_length))

        def run(ctx: Callable[[], Any], model: Any = model, img: Any = img, ids: Any = ids) -> None:
            with ctx():
                model(img, ids)

        reps = 10 * a.reps if preset == "scenes-teacher" else 2 * a.reps
        if a.tiny and preset != "scenes-teacher":
            continue
        t = timed({"no_grad": lambda: run(torch.no_grad), "inference_mode": lambda: run(torch.inference_mode)}, reps)
        res[f"teacher_forward_ms_{preset}"] = {k: v * 1e3 for k, v in t.items()} | {"batch": batch}
        rows.append(
            (
                f"teacher forward ({preset}, batch {batch}, 1 thread, {reps} reps): no_grad vs inference_mode",
                f"{t['no_grad'] * 1e3:.1f} vs {t['inference_mode'] * 1e3:.1f} ms",
                f"inference_mode / no_grad = {t['inference_mode'] / t['no_grad']:.3f}",
            )
        )


def _write(res: dict[str, Any], rows: list[tuple[str, str, str]], a: argparse.Namespace) -> None:
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["rows"] = [{"what": w, "value": v, "note": note} for w, v, note in rows]
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "data-cpu.json", res)
    md = [
        f"# Host-side costs of a distillation step on the CPU (`{res['command']}`)",
        "",
        (
            f"A shared {res['cpu_count']}-core machine ({res['torch_threads']} torch threads), loaded by other jobs: "
            f"load average {res['load_average_start'][0]} at the start, {res['load_average_end'][0]} at the end. Medians "
            f"of {a.reps} interleaved repetitions; absolute times are noisy, ratios between interleaved variants less "
            "so."
        ),
        "",
        "| what | cost | note |",
        "|---|---|---|",
    ] + [f"| {w} | {v} | {note} |" for w, v, note in rows]
    atomic_write_text(a.out / "data-cpu.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
