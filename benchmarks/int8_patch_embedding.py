"""What keeping the patch embedding float costs in a static int8 image tower: size on disk and CPU latency.

    python benchmarks/int8_patch_embedding.py --out /tmp/patch-embed [--width 768 --layers 12 --heads 12
        --image-size 224 --patch 32 --calib 64 --iters 30 --threads 1]

Builds a randomly initialised image tower of the given shape (default: ViT-B/32's), exports it to fp32 ONNX,
quantizes it twice with ``int8_keep="none"`` (every weight product int8 except the output projection): once with
the patch-embedding Conv float (the default) and once with it quantized as well, then times both with ONNX
Runtime on the CPU (interleaved rounds, batch 1, fixed thread count) and measures each against fp32 on held-out
images. Writes OUT/patch_embedding.json and prints a markdown table. Random weights: the sizes and latencies are
those of the real shape; the cosines are not those of a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _measure(graphs: dict[str, Path], images: np.ndarray, held: np.ndarray, threads: int, iters: int) -> list[dict]:
    """Each graph's size, batch-1 latency (interleaved rounds, rotating who goes first) and min cosine vs fp32."""
    from tinyclip_edge.common.embeddings import row_cosine
    from tinyclip_edge.runtimes.onnxrt import create_session, run_session

    sessions = {k: create_session(p, intra_op_threads=threads, inter_op_threads=1) for k, p in graphs.items()}
    ref = run_session(sessions["fp32"], held)
    x = images[:1]
    for s in sessions.values():  # warm-up
        for _ in range(3):
            run_session(s, x)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(iters):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            run_session(sessions[name], x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for name, path in graphs.items():
        cos = row_cosine(run_session(sessions[name], held), ref)
        rows.append(
            {
                "graph": name,
                "MB": round(path.stat().st_size / 1e6, 2),
                "p50_ms": round(float(np.median(times[name])), 2),
                "min_cosine_vs_fp32": round(float(cos.min()), 5),
            }
        )
    return rows


def _graphs(args: argparse.Namespace) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    """The random image tower as fp32 ONNX and quantized both ways; the calibration images and the held-out ones."""
    import torch

    from tinyclip_edge.common.preprocess import Preprocess
    from tinyclip_edge.data import scenes
    from tinyclip_edge.export import export_bundle
    from tinyclip_edge.export.data import load_pairs
    from tinyclip_edge.export.precision import QuantOptions, quantize
    from tinyclip_edge.export.quant_plan import holdout_count
    from tinyclip_edge.models import ClipModel, ClipPackage
    from tinyclip_edge.models.presets import uniform_shape

    torch.manual_seed(0)
    shape = uniform_shape(
        args.width,
        args.layers,
        args.heads,
        image_size=args.image_size,
        patch_size=args.patch,
        embed_dim=512,
        text_width=64,
        text_layers=1,
        text_heads=2,
    )
    pre = Preprocess.from_dict(scenes.preprocess_config(args.image_size))
    pkg = ClipPackage(ClipModel(shape).eval(), pre, scenes.tokenizer_config(24), {"teacher": "random"})
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = export_bundle(pkg, args.out / "fp32", towers=("image",), progress=False)
    images = load_pairs("scenes:calib", args.calib, pre, progress=False, what="calibration images").images
    held = images[: holdout_count(len(images))]
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    graphs = {"fp32": fp32 / "image.onnx"}
    for name, quantize_conv in (("int8, patch embedding float (default)", False), ("int8, patch embedding int8", True)):
        path = args.out / f"{'conv-int8' if quantize_conv else 'conv-float'}.onnx"
        quantize(
            fp32 / "image.onnx",
            path,
            work,
            "image",
            "int8",
            images,
            QuantOptions(keep="none", quantize_patch_embedding=quantize_conv),
            progress=False,
        )
        graphs[name] = path
    return graphs, images, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=64, help="calibration images (a quarter is held out)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    graphs, images, held = _graphs(args)
    rows = _measure(graphs, images, held, args.threads, args.iters)
    result = {
        "shape": {
            "width": args.width,
            "layers": args.layers,
            "heads": args.heads,
            "image_size": args.image_size,
            "patch": args.patch,
        },
        "threads": args.threads,
        "iters": args.iters,
        "held_out": len(held),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    (args.out / "patch_embedding.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| graph | MB | p50 ms (batch 1) | min cosine vs fp32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['graph']} | {r['MB']} | {r['p50_ms']} | {r['min_cosine_vs_fp32']} |")
    print(f"load average {result['load_average']}")


if __name__ == "__main__":
    main()
