"""One options schema each for export and bench (common/options.py), shared by the click commands, the recipe's
export: and bench: sections and the Python API: these tests fail when one of them drifts from the others."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click
import pytest

from tinyclip_edge.cli.bench import bench as bench_cmd
from tinyclip_edge.cli.export import export_cmd
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.options import BenchOptions, EngineOptions, ExportOptions, resolve_options
from tinyclip_edge.compress.recipe import BenchCfg, EnginesCfg, ExportCfg, load_recipe

ROOT = Path(__file__).resolve().parents[1]

# Flags that are no option of the schema, and why: where the output goes, how it is shown, per-call targets,
# and --batch (the deprecated name of --batch-profile). `export` takes two schemas: --format onnx's ExportOptions
# and --format engine's EngineOptions, which share --calib and --calib-count.
EXPORT_CLI_ONLY = {"fmt", "out", "quiet", "precision", "old_batch"}
BENCH_CLI_ONLY = {"out", "quiet"}
# Fields only a recipe has: what the pipeline exports and times, and its parity step.
EXPORT_RECIPE_ONLY = {
    "precisions",
    "models",
    "parity",
    "parity_data",
    "parity_count",
    "parity_options",
    "on_parity_failure",
}
BENCH_RECIPE_ONLY = {"precisions"}
ENGINES_RECIPE_ONLY = {"precisions"}


def _flags(cmd: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"}


@pytest.mark.parametrize(
    "cmd, schemas, cli_only",
    [(export_cmd, (ExportOptions, EngineOptions), EXPORT_CLI_ONLY), (bench_cmd, (BenchOptions,), BENCH_CLI_ONLY)],
)
def test_every_option_has_a_flag_with_the_same_default_and_every_flag_an_option(cmd, schemas, cli_only):
    flags = _flags(cmd)
    for schema in schemas:
        fields, defaults = {f.name for f in dataclasses.fields(schema)}, schema()
        assert fields - set(flags) == set(), "options without a flag"
        for name in fields:
            default = flags[name].default
            if name in ("batches", "batch_profile"):  # comma-separated text: "1" or "1,8"
                default = [int(b) for b in default.split(",")]
            assert default == getattr(defaults, name), f"--{name}: flag default {default!r} != {schema.__name__}'s"
    every_field = {f.name for schema in schemas for f in dataclasses.fields(schema)}
    assert set(flags) - every_field == cli_only, "flags that are neither options nor listed as CLI-only"


@pytest.mark.parametrize(
    "section, schema, recipe_only",
    [
        (ExportCfg, ExportOptions, EXPORT_RECIPE_ONLY),
        (BenchCfg, BenchOptions, BENCH_RECIPE_ONLY),
        (EnginesCfg, EngineOptions, ENGINES_RECIPE_ONLY),
    ],
)
def test_recipe_sections_are_the_option_schemas_plus_pipeline_fields(section, schema, recipe_only):
    assert issubclass(section, schema)
    hints, base = (
        typing.get_type_hints(section, include_extras=True),
        typing.get_type_hints(schema, include_extras=True),
    )
    extra = {f.name for f in dataclasses.fields(section)} - {f.name for f in dataclasses.fields(schema)}
    assert extra == recipe_only
    for name, tp in base.items():  # a section may change a default, never a type or a range
        assert hints[name] == tp, name


def test_the_python_api_checks_options_like_the_cli(tmp_path, tiny_model_dir):
    from tinyclip_edge.export import export_bundle
    from tinyclip_edge.runtimes.bench import run_bench

    with pytest.raises(UserError, match="export option 'calib_count' must be an integer >= 1, got 0"):
        export_bundle(tiny_model_dir, tmp_path / "a", options=ExportOptions(calib_count=0), progress=False)
    with pytest.raises(UserError, match="export option 'int8_min_cosine' must be a number in"):
        export_bundle(tiny_model_dir, tmp_path / "b", int8_min_cosine=7, progress=False)
    with pytest.raises(UserError, match="bench option 'warmup' must be an integer >= 0, got -1"):
        run_bench([tiny_model_dir], BenchOptions(warmup=-1))
    with pytest.raises(TypeError, match="not a field of BenchOptions"):
        run_bench([tiny_model_dir], iterations=3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # positive control: an options object and keyword fields together (keywords win)
    report = run_bench([tiny_model_dir], BenchOptions(tower="text", iters=5), iters=2, warmup=0, progress=False)
    assert {r["tower"] for r in report.rows} == {"text"} and report.rows[0]["iters"] == 2


def test_a_recipe_section_resolves_to_its_option_schema():
    recipe = load_recipe("quickstart", ["export.calib_method=entropy", "bench.seconds=0.5"])
    opts = resolve_options(ExportOptions, recipe.export, {})
    assert type(opts) is ExportOptions and opts.calib_method == "entropy" and opts.calib_count == 256
    bopts = resolve_options(BenchOptions, recipe.bench, {"tower": "image"})
    assert type(bopts) is BenchOptions and bopts.seconds == 0.5 and bopts.tower == "image" and bopts.batches == [1, 8]


def test_cli_errors_name_the_flag(tmp_path):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    r = CliRunner().invoke(main, ["bench", str(tmp_path), "--power-interval", "0"])
    assert r.exit_code == 1 and "option '--power-interval' must be an integer in [1, 60000], got 0" in r.output
    r = CliRunner().invoke(main, ["bench", str(tmp_path), "--seconds", "-1"])
    assert r.exit_code == 1 and "option '--seconds' must be a number > 0, got -1.0" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "b"), "--opset", "21"])
    assert r.exit_code == 1 and "exporter torchscript writes opset 20 at most, got opset 21" in r.output


# ------------------------------------------------------------------ parity (issue 19)
PARITY_CLI_ONLY = {"reference", "teacher", "data", "count", "out", "quiet"}  # what and where, per call


def test_every_parity_option_has_a_flag_with_the_same_default_and_every_flag_an_option():
    from tinyclip_edge.cli.export import parity_cmd
    from tinyclip_edge.common.options import ParityOptions

    flags, fields = _flags(parity_cmd), {f.name for f in dataclasses.fields(ParityOptions)}
    assert fields - set(flags) == set() and set(flags) - fields == PARITY_CLI_ONLY
    for name in fields:
        assert flags[name].default == getattr(ParityOptions(), name), name


def test_parity_defaults_are_one_table_rendered_into_the_help_and_the_docs():
    from tinyclip_edge.cli.export import parity_cmd
    from tinyclip_edge.common.options import PARITY_TOLERANCES, parity_table, tolerance_defaults
    from tinyclip_edge.export.exporter import VERIFY_MIN_COSINE
    from tinyclip_edge.export.parity_report import DEFAULT_TOLERANCES

    assert {p: t.min_cosine for p, t in DEFAULT_TOLERANCES.items()} == {
        p: g["min_cosine"] for p, g in PARITY_TOLERANCES.items()
    }
    assert VERIFY_MIN_COSINE == PARITY_TOLERANCES["fp32"]["min_cosine"]
    help_text = {p.name: p.help for p in parity_cmd.params if isinstance(p, click.Option)}
    assert tolerance_defaults("max_task_drop") == "fp32 0.5, fp16 1, int8/int8-dynamic/fp8 2"
    assert tolerance_defaults("max_task_drop") in help_text["max_task_drop"]
    assert "fp32/fp16 not checked, int8/int8-dynamic/fp8 0.97" in help_text["min_agreement"]
    docs = (ROOT / "docs" / "EXPORT.md").read_text()
    assert parity_table() in docs, "docs/EXPORT.md's table of the checks differs from common/options.py's"
    # positive control: a changed gate no longer matches the docs
    changed = {**PARITY_TOLERANCES, "fp16": {**PARITY_TOLERANCES["fp16"], "min_cosine": 0.998}}
    import tinyclip_edge.common.options as options

    original = options.PARITY_TOLERANCES
    try:
        options.PARITY_TOLERANCES = changed
        assert options.parity_table() not in docs
    finally:
        options.PARITY_TOLERANCES = original


def test_a_recipe_sets_parity_tolerances_with_the_cli_domains(tmp_path):
    recipe = load_recipe("quickstart", ["export.parity_options.min_cosine=0.995", "export.parity_options.batch_size=8"])
    assert recipe.export.parity_options.min_cosine == 0.995 and recipe.export.parity_options.batch_size == 8
    with pytest.raises(
        UserError, match=r"'export\.parity_options\.min_agreement' must be a number in \[0, 1\], got 97"
    ):
        load_recipe("quickstart", ["export.parity_options.min_agreement=97"])
    with pytest.raises(UserError, match=r"unknown recipe key 'export\.parity_options\.min_cos'"):
        load_recipe("quickstart", ["export.parity_options.min_cos=0.9"])


def test_the_parity_api_takes_options_and_keyword_fields(tmp_path, tiny_model_dir):
    from tinyclip_edge.common.options import ParityOptions
    from tinyclip_edge.export import export_bundle, run_parity

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    report = run_parity(bundle, ParityOptions(min_cosine=0.5), max_task_drop=3.0, data=None, progress=False)
    assert report.tolerance.min_cosine == 0.5 and report.tolerance.max_task_drop == 3.0
    with pytest.raises(UserError, match=r"parity option 'min_cosine' must be a number in \[-1, 1\], got 7"):
        run_parity(bundle, min_cosine=7, data=None, progress=False)
    with pytest.raises(TypeError, match="not a field of ParityOptions"):
        run_parity(bundle, min_cos=0.5, data=None, progress=False)
