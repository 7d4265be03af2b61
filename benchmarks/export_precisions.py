"""Export one model at every precision and run parity on each bundle; write a table of the results.

    python benchmarks/export_precisions.py runs/x/stage-2 --data scenes:val --calib scenes:calib \
        --out artifacts/precisions [--teacher runs/x/teacher] [--precisions fp32,fp16,int8,int8-dynamic,fp8]

Writes OUT/<precision>/ (bundles with parity.json/.md), OUT/precisions.json and OUT/precisions.md.
Numbers come from ONNX Runtime on this machine (CPU unless --device says otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tinyclip_edge.common.formats.bundle import BundleManifest
from tinyclip_edge.common.io import atomic_write_json, atomic_write_text
from tinyclip_edge.export import export_bundle, run_parity


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _interval(iv: list[float] | tuple[float, float] | None) -> str | None:
    return None if iv is None else f"[{iv[0]:+.2f}, {iv[1]:+.2f}]"


def _row(precision: str, seconds: float, manifest: BundleManifest, report) -> dict:
    art = report.artifacts[0]
    return {
        "precision": precision,
        "export_s": round(seconds, 1),
        "MB": round(sum(t.bytes for t in manifest.towers.values()) / 1e6, 1),
        "image_min_cos": round(art.towers["image"]["min_cosine"], 6),
        "text_min_cos": round(art.towers["text"]["min_cosine"], 6),
        "R@1": _r(art.tasks.retrieval_r1),
        "R@1_agree": _r(art.tasks.retrieval_agreement),
        "R@1_agree_confident": _r(art.tasks.retrieval_agreement_confident),
        "R@1_delta_pts": _r(art.tasks.retrieval_r1_delta),
        "R@1_delta_interval": _interval(art.tasks.retrieval_r1_delta_interval),
        "zs_top1": _r(art.tasks.zero_shot_top1),
        "zs_agree": _r(art.tasks.zero_shot_agreement),
        "float_nodes": {t: len(d.get("float_nodes", [])) for t, d in manifest.precision_details.items()},
        "passed": report.passed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", default="scenes:val")
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--calib", default="scenes:calib")
    ap.add_argument("--calib-count", type=int, default=512)
    ap.add_argument("--teacher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int8-dynamic,fp8")
    args = ap.parse_args()
    rows = []
    for precision in args.precisions.split(","):
        start = time.perf_counter()
        bundle = export_bundle(
            args.model,
            args.out / precision,
            precision=precision,
            calib=args.calib if precision.startswith("int8") or precision == "fp8" else None,
            calib_count=args.calib_count,
        )
        seconds = time.perf_counter() - start
        report = run_parity(bundle, data=args.data, count=args.count, teacher=args.teacher, device=args.device)
        report.write(bundle)
        rows.append(_row(precision, seconds, BundleManifest.read(bundle), report))
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(args.out / "precisions.json", rows)
    cols = list(rows[0])
    title = f"# Export precisions (`python benchmarks/export_precisions.py {' '.join(sys.argv[1:])}`)"
    table = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    atomic_write_text(args.out / "precisions.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
