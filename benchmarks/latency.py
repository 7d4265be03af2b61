"""Latency of an open_clip ViT-B/32 teacher against its 50%, 25% and 10% students (random weights: latency
does not depend on the values), through the project's runtimes and its bench.

CPU (default; ~10 minutes on 2 cores):
    python benchmarks/latency.py
  PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime dynamic int8, batch 1 and 8, both towers.
  Writes benchmarks/results/latency-cpu.{json,md,csv,png} and prints the table.

CUDA (one self-contained command for a GPU machine):
    python benchmarks/latency.py --device cuda --out DIR [--precisions fp16,bf16]
  PyTorch eager vs torch.compile vs CUDA graphs at fp16 and bf16, batch 1 and 64. Writes
  DIR/latency-cuda.{json,md,...}. Needs only torch + this repository on PYTHONPATH: without open_clip the
  teacher's shape is built in code (identical to open_clip's ViT-B-32, checked when open_clip is present).

Smoke run (CI): `--tiny` uses a 64-wide, 2+2-layer teacher at 32 px and its students, 2 iterations.

Students have the shapes `tinyclip_edge.compress.shapes.shape_for_ratio(teacher, ratio)` gives. Next to every
measured teacher/student speed-up (same runtime, mode, precision, tower and batch) the tables put the FLOP
ratio teacher/student of that tower (tinyclip_edge/models/flops.py): the speed-up the FLOPs alone predict.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout (the GPU machine) as well as an install
    sys.path.insert(0, str(ROOT))


TINY = False  # --tiny: a tiny teacher instead of ViT-B/32 (set by main)


@functools.lru_cache(maxsize=2)
def vit_b32_shape() -> tuple[Any, str]:
    """The teacher's shape: from open_clip when installed, else the same numbers written out."""
    from tinyclip_edge.models.presets import uniform_shape, vit_b_32_shape

    if TINY:
        return uniform_shape(64, 2, 2, embed_dim=32), "tiny teacher (--tiny: 64 wide, 2+2 layers, 32 px)"
    shape = vit_b_32_shape()
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return shape, "ViT-B-32 shape written in code (open_clip not installed)"
    from tinyclip_edge.models.openclip import shape_of_open_clip

    oc = open_clip.create_model("ViT-B-32", pretrained=None)
    if shape_of_open_clip(oc).to_dict() != shape.to_dict():
        raise SystemExit("open_clip's ViT-B-32 no longer matches the written-out shape; update vit_b32_shape()")
    return shape, f"open_clip {open_clip.__version__} ViT-B-32 (random weights)"


def models(ratios: list[float]) -> Iterator[tuple[str, Any]]:
    """(name, ClipModel) for the teacher and each student, random weights, fixed seed; one at a time, so a
    model is freed before the next is built."""
    import torch

    from tinyclip_edge.compress.shapes import shape_for_ratio
    from tinyclip_edge.models import ClipModel

    teacher, _ = vit_b32_shape()
    torch.manual_seed(0)
    yield "teacher", ClipModel(teacher).eval()
    for r in ratios:
        yield f"student-{round(r * 100)}", ClipModel(shape_for_ratio(teacher, r)).eval()


# ---------------------------------------------------------------------------------------------- CPU
def run_cpu(args: argparse.Namespace) -> Any:
    from tinyclip_edge.common.preprocess import Preprocess
    from tinyclip_edge.export import export_bundle
    from tinyclip_edge.models import ClipPackage, save_model_dir
    from tinyclip_edge.runtimes import open_runtime
    from tinyclip_edge.runtimes.bench import run_bench

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tce-latency-"))
    targets: list[Any] = []
    if TINY:
        from tinyclip_edge.data import scenes

        tok, pre = scenes.tokenizer_config(24), Preprocess.from_dict(scenes.preprocess_config(32))
    else:
        tok, pre = {"kind": "open_clip", "model": "ViT-B-32", "context_length": 77}, Preprocess(image_size=224)
    for name, model in models(args.ratios):
        t0 = time.perf_counter()
        pkg = ClipPackage(model, pre, tok, {"teacher": "ViT-B-32 (random)", "stage": name})
        model_dir = save_model_dir(pkg, work / name)
        fp32 = export_bundle(model_dir, work / f"{name}-onnx-fp32", verify=False, progress=False)
        int8 = export_bundle(
            model_dir, work / f"{name}-onnx-int8", precision="int8-dynamic", verify=False, progress=False
        )
        # PyTorch at each precision asked for (fp32 by default on the CPU: the model directory itself, so the
        # bench opens it and measures its memory); other precisions are runtimes named "<model> pyt <precision>"
        targets += [
            str(model_dir)
            if p == "fp32"
            else _named(open_runtime(str(model_dir), backend="pyt", device="cpu", precision=p), f"{name} pyt {p}")
            for p in args.precisions
        ] + [str(fp32), str(int8)]
        print(
            f"{name}: {model.num_params()['total'] / 1e6:.1f} M params, exported in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        del model, pkg  # only the saved artifacts are benchmarked; keep the heap clean for memory readings
    report = run_bench(
        targets,
        batches=args.batches or (1, 8),
        tower="both",
        device="cpu",
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads,
        progress=True,
    )
    return report


# ---------------------------------------------------------------------------------------------- CUDA
def run_cuda(args: argparse.Namespace) -> Any:
    import torch

    from tinyclip_edge.runtimes import open_runtime
    from tinyclip_edge.runtimes.bench import run_bench

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    batches = args.batches or (1, 64)
    opened = []
    for name, model in models(args.ratios):
        for prec in args.precisions:
            for mode in args.modes:
                label = f"{name} {mode} {prec}"
                if mode == "cudagraph":  # a graph is captured for one batch size: one runtime per batch
                    for b in batches:
                        opened.append(
                            (
                                b,
                                _named(
                                    open_runtime(
                                        model, backend="pyt", device="cuda", precision=prec, mode=mode, batch=b
                                    ),
                                    label,
                                ),
                            )
                        )
                else:
                    opened.append(
                        (
                            None,
                            _named(open_runtime(model, backend="pyt", device="cuda", precision=prec, mode=mode), label),
                        )
                    )
        print(f"{name}: {model.num_params()['total'] / 1e6:.1f} M params", flush=True)
    reports = []
    for b in batches:
        targets = [rt for fixed, rt in opened if fixed in (None, b)]
        reports.append(
            run_bench(
                targets, batches=(b,), tower="both", device="cuda", iters=args.iters, warmup=args.warmup, progress=True
            )
        )
    report = reports[0]
    for r in reports[1:]:  # per-batch runtimes (cudagraph) appear in one report each: merge artifacts and rows
        known = {a["name"] for a in report.artifacts}
        report.artifacts += [a for a in r.artifacts if a["name"] not in known]
        report.rows += r.rows
    report.add_speedups()  # against the merged report's first artifact, for every batch
    report.settings["batches"] = list(batches)
    report.settings["modes"] = list(args.modes)
    report.settings["precisions"] = list(args.precisions)
    report.notes.append(
        "cudagraph runtimes are captured per batch size; compile runtimes recompile for a new batch during warm-up"
    )
    return report


def _named(rt: Any, name: str) -> Any:
    rt.name = name
    return rt


# ---------------------------------------------------------------------------------------------- output
def split_name(artifact: str, model_names: list[str]) -> tuple[str, str]:
    """('student-50', 'compile fp16') from 'student-50 compile fp16'; bundles: ('student-50', 'onnx-int8')."""
    for m in sorted(model_names, key=len, reverse=True):
        if artifact == m or artifact.startswith((m + " ", m + "-")):
            return m, artifact[len(m) :].strip(" -") or "pyt"
    return artifact, ""


def flop_ratios(ratios: list[float]) -> dict[str, dict[str, float]]:
    """Teacher FLOPs / model FLOPs per tower (models/flops.py), for the teacher and every student."""
    from tinyclip_edge.compress.shapes import shape_for_ratio
    from tinyclip_edge.models.flops import tower_flops

    teacher, _ = vit_b32_shape()
    shapes = {"teacher": teacher, **{f"student-{round(r * 100)}": shape_for_ratio(teacher, r) for r in ratios}}
    return {
        name: {t: tower_flops(teacher, t).total / tower_flops(s, t).total for t in ("image", "text")}
        for name, s in shapes.items()
    }


def ratio_table(report: Any, ratios: list[float]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown + rows: per runtime variant, tower and batch, the teacher/student latency ratio (measured)
    next to the teacher/student FLOP ratio of that tower (what the FLOPs predict)."""
    fr = flop_ratios(ratios)
    names = list(fr)
    p50 = {}
    for r in report.rows:
        model, variant = split_name(r["artifact"], names)
        p50[(model, variant, r["tower"], r["batch"])] = r["p50_ms"]
    rows = []
    for (model, variant, tower, batch), ms in sorted(p50.items()):
        base = p50.get(("teacher", variant, tower, batch))
        if model == "teacher" or base is None or model not in fr:
            continue
        rows.append(
            {
                "model": model,
                "variant": variant,
                "tower": tower,
                "batch": batch,
                "p50_ms": ms,
                "teacher_p50_ms": base,
                "latency_ratio": base / ms,
                "flop_ratio": fr[model][tower],
            }
        )
    lines = [
        "| model | runtime | tower | batch | p50 ms (teacher) | speed-up measured | speed-up from FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['variant']} | {r['tower']} | {r['batch']} | {r['p50_ms']:.2f} "
        f"({r['teacher_p50_ms']:.2f}) | {r['latency_ratio']:.2f}x | {r['flop_ratio']:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines), rows


def write(report: Any, out: Path, stem: str, source: str, ratios: list[float]) -> None:
    table, rows = ratio_table(report, ratios)
    report.settings["flop_vs_latency"] = rows
    files = report.save(out, stem=stem)
    md = files["md"].read_text()
    files["md"].write_text(
        f"# Latency: ViT-B/32 teacher vs students ({stem}; `{report.settings['script']}`)\n\n"
        f"Teacher: {source}. Cells: p50 latency in ms (speedup over the first row).\n\n"
        f"{report.summary()}\n\n## Teacher/student latency ratio vs FLOP ratio\n\n"
        "Same runtime, mode and precision for teacher and student; the FLOP ratio counts the "
        "tower's matmuls (tinyclip_edge/models/flops.py).\n\n"
        f"{table}\n\n## Every statistic\n\n{md}"
    )
    print(report.summary())
    print(table)
    print("wrote " + ", ".join(str(p) for p in files.values()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument(
        "--ratios",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="student sizes; default 0.5,0.25,0.1 (--tiny: 0.5,0.25; the tiny teacher has no 10%% student)",
    )
    p.add_argument(
        "--batches",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="default 1,8 on cpu and 1,64 on cuda",
    )
    p.add_argument("--iters", type=int, default=None, help="default 10 on cpu, 100 on cuda")
    p.add_argument("--warmup", type=int, default=None, help="default 2 on cpu, 10 on cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (cpu mode)")
    p.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["eager", "compile", "cudagraph"],
        help="cuda mode: pyt modes to compare",
    )
    p.add_argument(
        "--precisions",
        type=lambda s: s.split(","),
        default=None,
        help="PyTorch precisions (fp32, fp16, bf16); default fp16,bf16 on cuda, fp32 on cpu",
    )
    p.add_argument("--work", help="keep the model dirs and ONNX bundles here (cpu mode; default a temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny models, 2 iterations: the CI smoke run")
    args = p.parse_args(argv)
    global TINY
    TINY = args.tiny
    vit_b32_shape.cache_clear()
    args.ratios = args.ratios or ([0.5, 0.25] if args.tiny else [0.5, 0.25, 0.1])
    cuda = args.device == "cuda"
    args.precisions = args.precisions or (["fp16", "bf16"] if cuda else ["fp32"])
    args.iters = args.iters or (2 if args.tiny else 100 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10 if cuda else 2)
    t0 = time.perf_counter()
    report = run_cuda(args) if cuda else run_cpu(args)
    report.settings["script"] = "benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report.settings["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write(report, args.out, f"latency-{args.device}", vit_b32_shape()[1], args.ratios)


if __name__ == "__main__":
    main()
