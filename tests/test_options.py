"""One options schema each for export and bench (common/options.py), shared by the click commands, the recipe's
export: and bench: sections and the Python API: these tests fail when one of them drifts from the others."""

from __future__ import annotations

import dataclasses
import typing

import click
import pytest

from tinyclip_edge.cli.bench import bench as bench_cmd
from tinyclip_edge.cli.export import export_cmd
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.options import BenchOptions, ExportOptions, resolve_options
from tinyclip_edge.compress.recipe import BenchCfg, ExportCfg, load_recipe

# Flags that are no option of the schema, and why: where the output goes, how it is shown, per-call targets,
# and the engine build (--format engine; build_engines takes those itself).
EXPORT_CLI_ONLY = {"fmt", "out", "quiet", "precision", "batch", "workspace", "dla", "timing_cache"}
BENCH_CLI_ONLY = {"out", "quiet"}
# Fields only a recipe has: what the pipeline exports and times, and its parity step.
EXPORT_RECIPE_ONLY = {"precisions", "models", "parity", "parity_data", "parity_count", "on_parity_failure"}
BENCH_RECIPE_ONLY = {"precisions"}


def _flags(cmd: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"}


@pytest.mark.parametrize(
    "cmd, schema, cli_only", [(export_cmd, ExportOptions, EXPORT_CLI_ONLY), (bench_cmd, BenchOptions, BENCH_CLI_ONLY)]
)
def test_every_option_has_a_flag_with_the_same_default_and_every_flag_an_option(cmd, schema, cli_only):
    flags, fields = _flags(cmd), {f.name: f for f in dataclasses.fields(schema)}
    assert set(fields) - set(flags) == set(), "options without a flag"
    assert set(flags) - set(fields) == cli_only, "flags that are neither options nor listed as CLI-only"
    defaults = schema()
    for name in fields:
        default = flags[name].default
        if name == "batches":  # --batch is text: "1" or "1,8"
            default = [int(b) for b in default.split(",")]
        if name == "int8_keep":
            assert default == defaults.int8_keep
            continue
        assert default == getattr(defaults, name), f"--{name}: flag default {default!r} != schema's"


@pytest.mark.parametrize(
    "section, schema, recipe_only",
    [(ExportCfg, ExportOptions, EXPORT_RECIPE_ONLY), (BenchCfg, BenchOptions, BENCH_RECIPE_ONLY)],
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
