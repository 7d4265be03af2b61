"""int8 on every x86 CPU: each int8 weight format's parity on this CPU and on an AVX2 CPU without VNNI.

    python benchmarks/int8_isa.py --model pruned|PRESET|MODEL_DIR --out DIR [--data scenes:val --count 64
        --calib scenes:calib --calib-count 64 --qemu-count 64 --iters 20 --threads 1]

For each weight format (``full-range``: int8 weights in [-127, 127], the format before issue 17; ``reduce-range``:
7-bit weights, the default now) and each int8 precision, the tower graphs are quantized exactly as the export does
(``int8_keep=auto``), then run by ONNX Runtime on this CPU and under ``qemu-x86_64 -cpu Haswell`` (an AVX2 CPU
without VNNI: ONNX Runtime picks its kernels from cpuid, so it runs its AVX2 code). Each run is judged by parity's
own checks against the PyTorch reference (min cosine per tower, the task checks: R@1 and zero-shot drops with
their paired intervals; agreement is reported, not judged); sizes and batch-1 latency are measured on this CPU
(interleaved rounds, fixed threads). Only ONNX Runtime runs under qemu (tests/_isa_worker.py), on the first
``--qemu-count`` inputs. ``--model pruned`` is the pruned test model of tests/conftest.py; a PRESET
(models/presets.py, e.g. vit-b-32-scenes) is randomly initialised (seed 0). Writes OUT/int8_isa.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_isa_worker.py"
FORMATS = {"full-range": False, "reduce-range": True}  # -> export.precision.REDUCE_RANGE


def _package(model: str):
    from tinyclip_edge.models.resolve import resolve_model

    if Path(model).is_dir():
        return resolve_model(model, what="model").package
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_package, pruned_shape

    from tinyclip_edge.models.presets import preset_shape

    return make_package(pruned_shape() if model == "pruned" else preset_shape(model), jitter=0.02)


def _run(job: Path, runs: list[list[str]], qemu: str | None = None) -> None:
    job.write_text(json.dumps({"runs": runs}))
    cmd = ([qemu, "-cpu", "Haswell"] if qemu else []) + [sys.executable, str(WORKER), str(job)]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if qemu else None)


def _latency(graph: Path, x: np.ndarray, iters: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x[:1]}
    sess.run(None, feed)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _judge(name: str, precision: str, got: dict, ref: dict, inp, n_classes: int) -> dict:
    """Parity's checks of one run (export/parity.py's own code) on the inputs both runs saw."""
    from tinyclip_edge.common import embeddings as M
    from tinyclip_edge.export.parity import _against_reference, _Embeddings
    from tinyclip_edge.export.parity_report import DEFAULT_TOLERANCES, Check

    def emb(d):
        e = object.__new__(_Embeddings)  # embeddings computed elsewhere (under qemu): no runtime to open here
        e.image, e.text = d["image"], d["text"]
        e.classes = None if d.get("prompts") is None else M.class_embeddings(d["prompts"], n_classes)
        return e

    tol = DEFAULT_TOLERANCES[precision]
    a, r = emb(got), emb(ref)
    checks = [
        Check.judged(name, t, "min_cosine", M.compare(a_, r_).min_cosine, tol.min_cosine)
        for t, a_, r_ in (("image", a.image, r.image), ("text", a.text, r.text))
    ]
    tasks, paired = _against_reference(a, r, inp, tol)
    checks += [
        Check.task_drop(name, s, paired[t], tol.max_task_drop)
        for s, t in (("retrieval", "retrieval"), ("zero-shot", "zero_shot"))
        if t in paired
    ]
    out = {c.scope + ("" if c.metric == "min_cosine" else " drop"): round(c.value, 5) for c in checks}
    out["agreement"] = (
        None if tasks.retrieval_agreement_confident is None else round(tasks.retrieval_agreement_confident, 3)
    )
    out["passed"] = all(c.passed for c in checks)
    return out


def _accumulator(graph: Path, tokens: Path, work: Path, qemu: str | None) -> dict:
    """The first MatMulInteger of a dynamic graph: its int32 result on this CPU and under qemu against the exact
    integer product of its (u8 activation, s8 weight) inputs, and against a model of AVX2's ``vpmaddubsw``
    (each sum of two adjacent u8 x s8 products clipped to int16, then summed exactly)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    weight = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[node.input[1]].astype(np.int64)
    runs = []
    for i, name in enumerate((node.input[0], node.input[2], node.output[0])):  # u8 input, its zero point, result
        del model.graph.output[:]
        model.graph.output.append(onnx.ValueInfoProto(name=name))
        onnx.save(model, str(work / f"acc{i}.onnx"))
        runs += [[str(work / f"acc{i}.onnx"), str(tokens), str(work / f"acc{i}.{w}.npy")] for w in ("native", "avx2")]
    _run(work / "acc-native.json", [r for r in runs if r[2].endswith("native.npy")])
    _run(work / "acc-avx2.json", [r for r in runs if r[2].endswith("avx2.npy")], qemu)
    a, zp = (np.load(work / f"acc{i}.native.npy").astype(np.int64) for i in (0, 1))
    exact = np.einsum("...k,kn->...n", a - zp, weight)
    even = a.shape[-1] + a.shape[-1] % 2
    ap = np.zeros(a.shape[:-1] + (even,), np.int64)
    ap[..., : a.shape[-1]] = a
    wp = np.zeros((even, weight.shape[1]), np.int64)
    wp[: weight.shape[0]] = weight
    pairs = ap[..., 0::2, None] * wp[0::2] + ap[..., 1::2, None] * wp[1::2]
    saturated = np.clip(pairs, -32768, 32767).sum(-2) - zp * weight.sum(0)
    native, avx2 = (np.load(work / f"acc2.{w}.npy") for w in ("native", "avx2"))
    return {
        "node": node.name,
        "inputs_identical": bool(np.array_equal(a, np.load(work / "acc0.avx2.npy"))),
        "native_equals_exact": bool(np.array_equal(native, exact)),
        "avx2_equals_exact": bool(np.array_equal(avx2, exact)),
        "avx2_equals_saturating_model": bool(np.array_equal(avx2, saturated)),
        "pairs_beyond_int16": float((np.abs(pairs) > 32767).mean()),
        "outputs_differing_on_avx2": float((avx2 != exact).mean()),
        "max_abs_int32_error_on_avx2": int(np.abs(avx2 - exact).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="scenes:val")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--calib", default="scenes:calib")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--qemu-count", type=int, default=64, help="inputs run under qemu (it is slow)")
    ap.add_argument(
        "--no-qemu-zero-shot", action="store_true", help="under qemu, skip the zero-shot prompts (all of them run)"
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    qemu = shutil.which("qemu-x86_64")
    pkg = _package(args.model)
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    pairs, feeds, ref, n = _prepare(pkg, args, out)
    graphs = _quantize_all(pkg, args, out)
    for where in ("native", "avx2") if qemu else ("native",):
        suffix = "" if where == "native" else ".qemu"
        runs = [
            [str(d / f"{g}.onnx"), str(out / f"{k}{suffix}.npy"), str(d / f"{k}.{where}.npy")]
            for d in graphs.values()
            for g, k in (("image", "image"), ("text", "text"), ("text", "prompts"))
            if not (k == "prompts" and where == "avx2" and args.no_qemu_zero_shot)
        ]
        _run(out / f"{where}.json", runs, qemu if where == "avx2" else None)
    rows = _rows(graphs, pairs, feeds, ref, n, args, qemu)
    accumulator = {
        fmt: _accumulator(graphs[fmt, "int8-dynamic"] / "text.onnx", out / "text.qemu.npy", out, qemu)
        for fmt in FORMATS
        if qemu
    }
    print(json.dumps(accumulator, indent=1))
    fp32_ms = {
        f"{t} ms": round(_latency(out / "fp32" / f"{t}.onnx", feeds[t], args.iters, args.threads), 2)
        for t in ("image", "text")
    }
    (out / "int8_isa.json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(out)}, "fp32": fp32_ms, "rows": rows, "accumulator": accumulator},
            indent=1,
            default=str,
        )
    )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"fp32 latency: {fp32_ms}")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def _prepare(pkg: Any, args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, np.ndarray], dict, int]:
    """The fp32 bundle, the inputs saved for the workers (all, and the first qemu-count for qemu) and the
    PyTorch reference embeddings."""
    from tinyclip_edge.export import export_bundle
    from tinyclip_edge.export.data import load_pairs
    from tinyclip_edge.runtimes import open_runtime

    export_bundle(pkg, out / "fp32", progress=False)
    pairs = load_pairs(args.data, args.count, pkg.preprocess, progress=False)
    tok = pkg.tokenizer()
    prompts = [t.format(c) for c in pairs.class_names for t in pairs.templates]
    n = min(args.qemu_count, len(pairs))
    feeds = {
        "image": pairs.images,
        "text": tok(pairs.captions).astype(np.int32),
        "prompts": tok(prompts).astype(np.int32),
    }
    for k, v in feeds.items():
        np.save(out / f"{k}.npy", v)
        np.save(out / f"{k}.qemu.npy", v if k == "prompts" else v[:n])
    with open_runtime(pkg, backend="pyt", normalize=True) as rt:
        ref = {"image": np.concatenate([rt.encode_image(pairs.images[i : i + 32]) for i in range(0, len(pairs), 32)])}
        ref["text"] = np.concatenate([rt.encode_text(feeds["text"][i : i + 32]) for i in range(0, len(pairs), 32)])
        ref["prompts"] = rt.encode_text(feeds["prompts"])
    return pairs, feeds, ref, n


def _quantize_all(pkg: Any, args: argparse.Namespace, out: Path) -> dict[tuple[str, str], Path]:
    """Each weight format x int8 precision, both towers quantized from the fp32 bundle: (format, precision) -> folder."""
    from tinyclip_edge.export import precision as P
    from tinyclip_edge.export.exporter import _calibration

    calib, _ = _calibration(pkg, args.calib, args.calib_count, ("image", "text"), False)
    graphs = {}
    for fmt, reduce in FORMATS.items():
        P.REDUCE_RANGE = reduce
        for precision in ("int8", "int8-dynamic"):
            for tower in ("image", "text"):
                d = out / f"{fmt}-{precision}"
                d.mkdir(exist_ok=True)
                P.quantize(
                    out / "fp32" / f"{tower}.onnx",
                    d / f"{tower}.onnx",
                    d,
                    tower,
                    precision,
                    calib[tower],
                    P.QuantOptions(),
                    progress=False,
                )
            graphs[fmt, precision] = d
    return graphs


def _rows(graphs: dict, pairs: Any, feeds: dict, ref: dict, n: int, args: argparse.Namespace, qemu: Any) -> list[dict]:
    """The verdict of each graph on each CPU (native, and the AVX2 emulation), with size and latency natively."""
    from tinyclip_edge.export.parity import _Inputs

    def inputs(m: int) -> Any:
        return _Inputs(pairs.images[:m], feeds["text"][:m], pairs.labels[:m], feeds["prompts"], len(pairs.class_names))

    rows = []
    for (fmt, precision), d in graphs.items():
        for where in ("native", "avx2") if qemu else ("native",):
            m = len(pairs) if where == "native" else n
            got = {k: np.load(f) for k in ("image", "text", "prompts") if (f := d / f"{k}.{where}.npy").is_file()}
            want = {k: v[:m] if k != "prompts" else v for k, v in ref.items()}
            row = {"format": fmt, "precision": precision, "cpu": where, "samples": m}
            row |= _judge(f"{fmt} {precision}", precision, got, want, inputs(m), len(pairs.class_names))
            if where == "native":
                row["MB"] = round(sum((d / f"{t}.onnx").stat().st_size for t in ("image", "text")) / 1e6, 2)
                row |= {
                    f"{t} ms": round(_latency(d / f"{t}.onnx", feeds[t], args.iters, args.threads), 2)
                    for t in ("image", "text")
                }
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
