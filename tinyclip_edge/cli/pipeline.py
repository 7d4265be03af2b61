"""The whole path in one call: compress -> export (ONNX) -> parity -> engines -> bench, as a recipe asks.

This is wiring, so it lives with the CLI: the compression core never imports `export` or `runtimes`.
Every step is resumable: finished stages are skipped by the runner, and a bundle whose manifest
records the same source weights is not exported again, nor are engines the manifest lists for the same profile
and library built again.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..common import dist
from ..common.errors import UserError
from ..common.io import atomic_write_json, atomic_write_text, read_json, remove_stale_temps
from ..common.vocab import ENGINE_PRECISIONS
from ..compress.recipe import Recipe, load_recipe
from ..compress.rundir import BENCH_DIR, EXPORT_DIR, REPORT_JSON, REPORT_MD, STATE_FILE, RunLayout, run_lock
from ..compress.runner import RunResult, run_compress
from ..evaluation import markdown_table

log = logging.getLogger("tinyclip_edge")


@dataclass
class PipelineResult:
    run: RunResult
    bundles: dict[str, Path] = field(default_factory=dict)  # "<model>-<precision>" -> bundle dir
    parity_failed: list[str] = field(default_factory=list)


def _models(recipe: Recipe, run: RunResult) -> dict[str, Path]:
    stages = {p.name: p for p in run.stage_dirs}
    if recipe.export.models == "last":
        return dict(list(stages.items())[-1:])
    if recipe.export.models == "students" or run.teacher_dir is None:
        return stages
    return {"teacher": run.teacher_dir, **stages}  # "all" (the recipe's schema allows nothing else)


def _up_to_date(bundle: Path, model_dir: Path) -> bool:
    """A finished bundle exported from these exact weights (resume skips it)."""
    from ..common.formats.bundle import BundleManifest, is_bundle
    from ..common.formats.model_dir import WEIGHTS_NAME
    from ..common.integrity import sha256_file

    if not is_bundle(bundle):
        return False
    try:
        manifest = BundleManifest.read(bundle)
    except UserError:  # damaged or tampered with: export it again
        return False
    return manifest.source.sha256 == sha256_file(model_dir / WEIGHTS_NAME)


def _calib_spec(recipe: Recipe) -> str:
    cfg = recipe.export
    if cfg.calib:
        return cfg.calib
    if recipe.data.calib:
        return recipe.data.calib
    return "scenes:calib" if recipe.data.train.startswith("scenes:") else recipe.data.train


def export_and_check(recipe: Recipe, run: RunResult) -> PipelineResult:
    from ..export.exporter import export_bundle
    from ..export.parity import run_parity

    cfg, out = recipe.export, PipelineResult(run)
    rows, parity = [], {}
    teacher = run.teacher_dir
    for name, model_dir in _models(recipe, run).items():
        for precision in cfg.precisions:
            key = f"{name}-{precision}"
            bundle = RunLayout(run.run_dir).path(EXPORT_DIR) / key
            remove_stale_temps(bundle)  # a killed export's debris, even when this bundle is up to date
            if not _up_to_date(bundle, model_dir):
                click.echo(f"export {key}", err=True)
                # the section IS an ExportOptions (plus pipeline fields, which export_bundle ignores)
                export_bundle(
                    model_dir,
                    bundle,
                    precision=precision,
                    options=cfg,
                    calib=_calib_spec(recipe) if precision in ("int8", "fp8") else None,
                    progress=False,
                )
            out.bundles[key] = bundle
            if not cfg.parity:
                continue
            rep = run_parity(
                bundle,
                cfg.parity_options,
                reference=model_dir,
                teacher=teacher if name != "teacher" else None,
                data=cfg.parity_data or recipe.eval.data or "scenes:val",
                count=cfg.parity_count,
                progress=False,
            )
            rep.write(bundle)
            parity[key] = rep.to_dict()
            rows.append(_parity_row(key, rep))
            if not rep:
                out.parity_failed.append(key)
    if cfg.parity:
        _add_to_report(
            run.run_dir,
            "parity",
            parity,
            "## Export and parity (ONNX Runtime vs PyTorch)",
            "Each bundle against its own PyTorch model on the evaluation data; full reports in "
            "`export/<bundle>/parity.md`.",
            rows,
        )
    return out


def _parity_row(key: str, rep: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"bundle": key, "precision": rep.precision, "result": "PASS" if rep else "FAIL"}
    if rep.artifacts:
        art = rep.artifacts[0]
        for tower, m in art.towers.items():
            row[f"{tower} min cos"] = f"{m['min_cosine']:.5f}"
        if art.tasks.retrieval_r1 is not None:
            row["R@1 (i2t)"] = f"{100 * art.tasks.retrieval_r1:.1f}"
        if art.tasks.retrieval_r1_delta is not None:
            lo, hi = art.tasks.retrieval_r1_delta_interval
            row["ΔR@1 pts"] = f"{art.tasks.retrieval_r1_delta:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        if art.tasks.retrieval_agreement is not None:
            row["top-1 agree"] = f"{100 * art.tasks.retrieval_agreement:.1f}%"
        if art.tasks.retrieval_agreement_confident is not None:
            row["agree (clear)"] = f"{100 * art.tasks.retrieval_agreement_confident:.1f}%"
    fails = rep.failures()
    if fails:
        row["failed checks"] = "; ".join(f"{c.scope} {c.metric} {c.value:.4g} < {c.threshold:g}" for c in fails[:2])
    return row


def _bundles_of(result: PipelineResult, precisions: list[str]) -> dict[str, Path]:
    """The exported bundles of these precisions ("student-int8" is int8; "student-int8-dynamic" is not)."""
    return {k: p for k, p in result.bundles.items() if any(k.endswith(f"-{x}") for x in precisions)}


def engines(recipe: Recipe, result: PipelineResult) -> None:
    """TensorRT engines for the exported bundles, each in its bundle's precision (the `engines:` section)."""
    from ..common.formats.bundle import BundleManifest
    from ..export.tensorrt import build_engines, engines_up_to_date

    cfg = recipe.engines
    rows = []
    for key, bundle in _bundles_of(result, _engine_precisions(recipe)).items():
        manifest = BundleManifest.read(bundle)  # once for both: the check and the build
        entries = engines_up_to_date(bundle, cfg, manifest)
        if entries is None:
            click.echo(f"engines {key}", err=True)
            # the section IS an EngineOptions (plus precisions, which build_engines ignores)
            entries = build_engines(bundle, cfg, manifest=manifest, verbose=False)
        rows += [_engine_row(key, e) for e in entries]
    _add_to_report(
        result.run.run_dir,
        "engines",
        rows,
        "## TensorRT engines",
        f"Built into each bundle with profile {'/'.join(map(str, cfg.batch_profile))} (min/opt/max batch); "
        "each engine's build flags and the equivalent command are in its `<tower>.engine.json`.",
        rows,
    )


def _engine_precisions(recipe: Recipe) -> list[str]:
    """The exported precisions that get engines (the recipe's schema guarantees at least one)."""
    return recipe.engines.precisions or [p for p in recipe.export.precisions if p in ENGINE_PRECISIONS]


def _engine_row(key: str, e: dict[str, Any]) -> dict[str, Any]:
    return {
        "bundle": key,
        "tower": e["tower"],
        "library": f"{e['library']} {e['library_version']}",
        "precision": e["precision"],
        "MiB": round(e["size_bytes"] / 2**20, 2),
    }


def bench(recipe: Recipe, result: PipelineResult) -> None:
    from ..runtimes.bench import run_bench

    cfg = recipe.bench
    targets = [str(p) for p in _bundles_of(result, cfg.precisions or recipe.export.precisions).values()]
    if not targets:
        raise UserError("bench: no exported bundles to time; add an export: section or fix bench.precisions")
    # the section IS a BenchOptions (plus `precisions`, which run_bench ignores)
    rep = run_bench(targets, cfg, out_dir=RunLayout(result.run.run_dir).path(BENCH_DIR), progress=False)
    _add_to_report(
        result.run.run_dir,
        "latency",
        rep.to_dict(),
        "## Latency (teacher vs students)",
        f"p50 latency in ms (speed-up over the first row), ONNX Runtime on {cfg.device}, "
        f"{cfg.iters} timed runs per cell, interleaved; every statistic in `bench/bench.md`.",
        None,
        rep.summary(size_digits=2),
    )


def _add_to_report(
    run_dir: Path,
    key: str,
    data: Any,
    title: str,
    caption: str,
    rows: list[dict[str, Any]] | None,
    table: str | None = None,
) -> None:
    """Add a section to report.json and report.md (replacing an older one of the same title)."""
    layout = RunLayout(run_dir)
    rj = layout.path(REPORT_JSON)
    report = read_json(rj, "report") if rj.is_file() else {}
    report[key] = data
    atomic_write_json(rj, report)
    rm = layout.path(REPORT_MD)
    md = rm.read_text() if rm.is_file() else ""
    if title in md:
        md = md[: md.index(title)].rstrip() + "\n"
    section = "\n".join([title, "", caption, "", table or markdown_table(rows or []), ""])
    atomic_write_text(rm, md.rstrip() + "\n\n" + section)
    click.echo(section)


def preflight(recipe: Recipe) -> None:
    """What the export and bench steps need from this machine, checked before compressing: every value of the
    recipe was checked when it was loaded, but a CUDA bench device, tegrastats or ONNX Runtime must also be
    here, or the run would fail after hours of training."""
    from ..common.devices import require_device
    from ..common.errors import MissingDependency

    if recipe.bench is not None:
        require_device(recipe.bench.device, "bench.device")
        if recipe.bench.power:
            from ..runtimes.tegrastats import TegraStats

            if not TegraStats.available():
                raise UserError("bench.power: true needs tegrastats (a Jetson); it is not on PATH")
    needs_ort = recipe.bench is not None or (
        recipe.export is not None
        and (recipe.export.parity or any(p.startswith("int8") or p == "fp8" for p in recipe.export.precisions))
    )
    if needs_ort and importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependency("onnxruntime", "cpu", "the recipe's export: parity / int8 and bench: sections")
    if recipe.engines is not None:  # TensorRT must be here (its error says how to install it) and build these
        from ..export.tensorrt import check_buildable

        check_buildable(recipe.engines, _engine_precisions(recipe))


def run_recipe(recipe: Recipe, resume: bool = False, new_lr: bool = False) -> PipelineResult:
    """Compress, then export / parity / bench as the recipe asks, holding the run directory's lock throughout.
    `new_lr`: an explicit --resume that may change the learning rates (see `run_compress`)."""
    preflight(recipe)
    with run_lock(recipe.run_dir):
        return _run_recipe(recipe, resume, new_lr)


def _run_recipe(recipe: Recipe, resume: bool, new_lr: bool = False) -> PipelineResult:
    run = run_compress(recipe, resume=resume, new_lr=new_lr)
    result = PipelineResult(run)
    if dist.env_rank() != 0:  # under torchrun, rank 0 alone exports, checks parity and benchmarks
        return result
    if recipe.export is not None:
        result = export_and_check(recipe, run)
    if recipe.engines is not None:  # the recipe's schema guarantees an export: section beside it
        engines(recipe, result)
    if recipe.bench is not None:  # the recipe's schema guarantees an export: section beside it
        bench(recipe, result)
    if result.parity_failed:
        msg = f"parity failed for {', '.join(result.parity_failed)} (see report.md and export/<bundle>/parity.md)"
        if recipe.export.on_parity_failure == "error":
            raise UserError(msg + "; set export.on_parity_failure=warn to accept it")
        click.echo(f"warning: {msg}", err=True)
    return result


def run_quickstart(
    run_dir: str = "runs/quickstart", resume: bool = True, overrides: list[str] | None = None
) -> PipelineResult:
    """The quick start in `run_dir`. By default it continues the run there (refused if that run was made with
    other settings). `resume=False` (--fresh) first deletes what the marker says the toolkit wrote there,
    nothing else, and refuses a directory that holds a run without a marker."""
    if any(o.split("=", 1)[0].strip() == "run_dir" for o in overrides or []):  # it would be silently replaced
        raise UserError("quickstart takes its directory from --run-dir DIR, not from a run_dir=DIR override")
    recipe = load_recipe("quickstart", [*(overrides or []), f"run_dir={run_dir}"])
    if not resume and dist.launched():  # every process would clear the directory while the others read it
        raise UserError(
            "quickstart --fresh runs in one process only: start over without torchrun, or choose another --run-dir"
        )
    with run_lock(run_dir):  # held from the clean-up to the end: nobody can start a run in between
        layout = RunLayout(run_dir)
        if not resume:
            removed = layout.clear()
            if removed:
                click.echo(f"--fresh: removed the previous run's {', '.join(removed)} from {run_dir}", err=True)
        return run_recipe(recipe, resume=layout.root.joinpath(STATE_FILE).is_file())
