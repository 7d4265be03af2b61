"""The report of a run: every model evaluated on the same data, as JSON and a markdown table.

When scratch baselines were trained, the report compares each distilled student with the same shape
trained from scratch for as many steps: TinyCLIP's central claim is that inheritance + distillation wins.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..common.io import atomic_write_json, atomic_write_text
from ..evaluation import embed_spec, evaluate, markdown_table, metrics, table_row
from ..models import load_model_dir
from .rundir import REPORT_JSON, REPORT_MD

log = logging.getLogger("tinyclip_edge")


def _r1(res: dict[str, Any]) -> float:
    return (res["i2t"]["R@1"] + res["t2i"]["R@1"]) / 2


def evaluate_run(run: Any, result: Any) -> dict[str, Any]:
    cfg, data = run.recipe.eval, run.recipe.data
    opts = {
        "csv_image_key": data.csv_image_key,
        "csv_caption_key": data.csv_caption_key,
        "csv_separator": data.csv_separator,
        "image_root": data.image_root,
    }
    kw = {"batch_size": cfg.batch_size, "max_pairs": cfg.max_pairs, "device": run.device, "data_options": opts}
    t0 = time.perf_counter()
    teacher_pkg = load_model_dir(result.teacher_dir) if result.teacher_dir else None
    report: dict[str, Any] = {
        "recipe": run.recipe.name,
        "run_dir": str(run.dir),
        "data": cfg.data,
        "teacher": None,
        "students": [],
        "baselines": [],
        "comparison": [],
    }
    teacher = None
    if teacher_pkg is not None:
        teacher = embed_spec(teacher_pkg, cfg.data, **kw)  # embedded once, compared with every student
        report["teacher"] = {
            "name": "teacher",
            "spec": run.recipe.teacher,
            "data": cfg.data,
            "params": teacher_pkg.model.num_params(),
            **metrics(teacher),
        }
    for sdir in result.stage_dirs:
        pkg = load_model_dir(sdir)
        res = evaluate(pkg, cfg.data, teacher=teacher, **kw)
        report["students"].append(
            {"name": sdir.name, "method": pkg.provenance.get("method"), "steps": pkg.provenance.get("steps"), **res}
        )
    for stage, bdir in result.baseline_dirs.items():
        pkg = load_model_dir(bdir)
        res = evaluate(pkg, cfg.data, teacher=teacher, **kw)
        report["baselines"].append(
            {"name": bdir.name, "shape_of": stage, "method": "scratch", "steps": pkg.provenance.get("steps"), **res}
        )
        student = next(s for s in report["students"] if s["name"] == stage)
        report["comparison"].append(
            {
                "stage": stage,
                "params": student["params"]["total"],
                "distilled_R@1": round(_r1(student), 2),
                "scratch_R@1": round(_r1(res), 2),
                "delta_R@1": round(_r1(student) - _r1(res), 2),
                "distilled_wins": _r1(student) > _r1(res),
                "steps": student["steps"],
                "scratch_steps": res.get("steps", pkg.provenance.get("steps")),
            }
        )
    report["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    tp = report["teacher"]["params"]["total"] if report["teacher"] else None
    rows = []
    if report["teacher"]:
        rows.append(table_row("teacher", report["teacher"], tp))
    for s in report["students"]:
        rows.append(table_row(f"{s['name']} ({s['method']}, {s['steps']} steps)", s, tp))
    for b in report["baselines"]:
        rows.append(table_row(f"{b['name']} (from scratch, {b['steps']} steps)", b, tp))
    lines = [
        f"# Report: {report['recipe']}",
        "",
        f"Evaluated on `{report['data']}` "
        "(R@K and mAP in %, both retrieval directions; `top1 agree`: image->text top-1 agreement with the teacher).",
        "",
        markdown_table(rows),
        "",
    ]
    if report["comparison"]:
        lines += [
            "## Weight inheritance + distillation vs. training from scratch",
            "",
            "Same student shape, same number of optimiser steps (the scratch model gets the student's "
            "cumulative steps over all stages so far); R@1 is the mean of both directions.",
            "",
            markdown_table(
                [
                    {
                        "stage": c["stage"],
                        "params": f"{c['params']:,}",
                        "distilled R@1": c["distilled_R@1"],
                        "scratch R@1": c["scratch_R@1"],
                        "delta": f"{c['delta_R@1']:+.2f}",
                        "winner": "distilled" if c["distilled_wins"] else "scratch",
                    }
                    for c in report["comparison"]
                ]
            ),
            "",
        ]
    return "\n".join(lines)


def write_report(run: Any, result: Any) -> dict[str, Any]:
    report = evaluate_run(run, result)
    atomic_write_json(run.layout.path(REPORT_JSON), report)
    md = render_markdown(report)
    atomic_write_text(run.layout.path(REPORT_MD), md)
    print(md)
    return report
