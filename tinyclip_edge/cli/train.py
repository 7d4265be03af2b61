"""Commands of the compression core: compress, quickstart, eval, info."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..common import dist
from ..common.errors import UserError

COMMANDS: list[click.Command] = []


def _command(fn: click.Command) -> click.Command:
    COMMANDS.append(fn)
    return fn


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def _opt_ins(fn: click.Command) -> click.Command:
    """What only the command line may allow (data/optin.py): a recipe alone never runs or unpickles anything."""
    fn = click.option(
        "--trust-detector",
        is_flag=True,
        help="Let dclip.detector be a pickled ultralytics .pt (unpickling runs code: only files you trust).",
    )(fn)
    return click.option(
        "--allow-remote-data",
        is_flag=True,
        help="Let data specs be URLs webdataset fetches or runs (pipe:, http:, s3:, ...); never from a recipe alone.",
    )(fn)


def _recipe_for(
    recipe: str | None, overrides: tuple[str, ...], teacher: str | None, resume_dir: str | None, run_dir: str | None
):
    """The recipe of a new run (RECIPE + overrides), or the one saved in a run being resumed with the
    overrides given (the runner refuses any but the learning rates: `rundir.RESUME_MAY_CHANGE`)."""
    from ..compress.recipe import load_recipe
    from ..compress.rundir import STATE_FILE

    if resume_dir:
        saved = Path(resume_dir) / "recipe.yaml"
        if not (Path(resume_dir) / STATE_FILE).is_file() or not saved.is_file():
            raise UserError(
                f"--resume: {resume_dir} holds no run (no {STATE_FILE}); "
                "start one with `tinyclip-edge compress RECIPE run_dir=DIR`"
            )
        if recipe and "=" in recipe:  # `--resume DIR stages.0.lr=1e-4`: click took the override for RECIPE
            recipe, overrides = None, (recipe, *overrides)
        if recipe or teacher:
            click.echo(f"note: resuming with the recipe saved in {saved}; RECIPE and --teacher are ignored", err=True)
        return load_recipe(str(saved), [*overrides, f"run_dir={resume_dir}"])
    if not recipe:
        raise UserError("give a RECIPE (a YAML file or one of the packaged recipes) or --resume DIR")
    extra = [f"teacher={teacher}"] if teacher else []
    extra += [f"run_dir={run_dir}"] if run_dir else []
    return load_recipe(recipe, [*overrides, *extra])


def _run_options(fn: click.Command) -> click.Command:
    """The arguments and options of every command that writes a run (compress, run): same names, same meaning."""
    fn = _opt_ins(fn)
    for deco in reversed(
        [
            click.argument("recipe", required=False),
            click.argument("overrides", nargs=-1),
            click.option(
                "--teacher", help="Teacher: open_clip NAME[:TAG|:CKPT], hf-hub:ID, a model directory, or builtin:NAME."
            ),
            click.option(
                "--resume",
                "resume_dir",
                type=click.Path(file_okay=False),
                help="Continue the run in this directory (uses the recipe saved there).",
            ),
            click.option("--run-dir", help="Where to write the run (default: runs/<recipe name>)."),
        ]
    ):
        fn = deco(fn)
    return fn


@_command
@click.command()
@_run_options
def compress(**opts: Any) -> None:
    """Compress a teacher with RECIPE (a YAML file or a packaged recipe name), stage by stage.

    OVERRIDES are dotted key=value pairs, e.g. stages.0.steps=200 data.train=pairs.csv.
    """
    from ..compress.runner import run_compress

    with _recipe_to_run(opts) as (rec, resume):
        result = run_compress(rec, resume=resume, new_lr=resume)
    if dist.env_rank() == 0:  # under torchrun, one line from rank 0, not one per process
        click.echo(f"done: students in {', '.join(str(p) for p in result.stage_dirs)}")


@contextmanager
def _recipe_to_run(opts: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """(the recipe a run command's options name, whether it resumes), inside the data opt-ins it was given."""
    from ..data.optin import opted_in

    _logging()
    with opted_in(remote_data=opts["allow_remote_data"], trust_detector=opts["trust_detector"]):
        rec = _recipe_for(opts["recipe"], opts["overrides"], opts["teacher"], opts["resume_dir"], opts["run_dir"])
        yield rec, bool(opts["resume_dir"])


@_command
@click.command()
@click.argument("overrides", nargs=-1)
@click.option("--run-dir", default="runs/quickstart", show_default=True)
@click.option(
    "--resume/--fresh",
    default=True,
    show_default=True,
    help="Continue the quick start in --run-dir (refused if it was made with other settings), or start "
    "over: --fresh deletes only what tinyclip-edge recorded writing there, never other files.",
)
def quickstart(overrides: tuple[str, ...], run_dir: str, resume: bool) -> None:
    """Train a small teacher on built-in data, compress it twice, compare with scratch, export to ONNX,
    check parity and time teacher vs students; writes RUN_DIR/report.md and report.json (CPU, minutes).

    OVERRIDES (key=value) change the packaged quickstart recipe, e.g. teacher=runs/x/teacher.
    """
    from .pipeline import run_quickstart

    _logging()
    result = run_quickstart(run_dir, resume=resume, overrides=list(overrides))
    click.echo(f"report: {result.run.run_dir / 'report.md'} and report.json")


@_command
@click.command("run")
@_run_options
def run_cmd(**opts: Any) -> None:
    """Run RECIPE end to end: compress, then export / parity / engines / bench when the recipe has those sections."""
    from .pipeline import run_recipe

    with _recipe_to_run(opts) as (rec, resume):
        result = run_recipe(rec, resume=resume, new_lr=resume)
    click.echo(
        f"done: report in {result.run.run_dir / 'report.md'}"
        + (f"; {len(result.bundles)} bundles in {result.run.run_dir / 'export'}" if result.bundles else "")
    )


@_command
@click.command("eval")
@click.argument("model")
@click.option("--data", default="scenes:val", show_default=True, help="scenes:val, a CSV/TSV or a COCO captions JSON.")
@click.option("--teacher", help="Also report agreement with this teacher (model dir or open_clip spec).")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--max-pairs", type=int, help="Evaluate on the first N pairs only.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the metrics as JSON here.")
def eval_cmd(
    model: str, data: str, teacher: str | None, batch_size: int, max_pairs: int | None, device: str, out: str | None
) -> None:
    """Evaluate MODEL (a model directory or an open_clip spec): retrieval, zero-shot, compositional."""
    from ..common.devices import check_device
    from ..common.io import atomic_write_json
    from ..common.options import cli_name
    from ..common.typed import from_dict
    from ..compress.recipe import EvalCfg
    from ..compress.teacher import resolve_teacher
    from ..evaluation import evaluate, markdown_table, table_row

    _logging()
    # the recipe's eval: schema checks the same options here (data spec, batch size, pair count)
    from_dict(
        EvalCfg, {"data": data, "batch_size": batch_size, "max_pairs": max_pairs}, label="option", key_format=cli_name
    )
    check_device(device)
    pkg = resolve_teacher(model)
    tpkg = resolve_teacher(teacher) if teacher else None
    res = evaluate(pkg, data, teacher=tpkg, batch_size=batch_size, max_pairs=max_pairs, device=device)
    rows = [table_row(Path(model).name or model, res, tpkg.model.num_params()["total"] if tpkg else None)]
    if tpkg:
        rows.insert(0, table_row("teacher", res["teacher"]))
    click.echo(markdown_table(rows))
    if out:
        atomic_write_json(out, res)
        click.echo(f"wrote {out}")


@_command
@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model: str, as_json: bool) -> None:
    """Show a model directory: parameters per tower, shapes, preprocessing, provenance."""
    from ..models import read_config
    from ..models.package import check_weights

    cfg = read_config(model)
    check_weights(model, cfg)  # what is printed must describe the weights, not just the config
    if as_json:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    p, shape = cfg.params, cfg.shape
    click.echo(
        f"{model}: {p['total']:,} parameters (image {p['image']:,}, text {p['text']:,}), "
        f"embedding dim {shape['embed_dim']}"
    )
    for tower in ("vision", "text"):
        s = shape[tower]
        click.echo(f"  {tower:6s} width {s['width']}, {len(s['heads'])} layers, heads {s['heads']}, mlp {s['mlp']}")
    v = shape["vision"]
    click.echo(
        f"  image  {v['image_size']}px, patch {v['patch_size']}; text context {shape['text']['context_length']}, "
        f"tokenizer {cfg.tokenizer.get('kind')} {cfg.tokenizer.get('model', '')}".rstrip()
    )
    prov = cfg.provenance
    click.echo("  provenance: " + ", ".join(f"{k}={v}" for k, v in prov.items() if v is not None))
