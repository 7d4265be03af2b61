"""Commands of the edge side: export (ONNX bundles, TensorRT engines) and parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from ..common.errors import UserError
from ..common.options import (
    AGREEMENT_MARGIN,
    EngineOptions,
    ExportOptions,
    ParityOptions,
    cli_name,
    engine_flag_name,
    tolerance_defaults,
)
from ..common.typed import from_dict

_FORMAT_HELP = (
    "onnx: model -> ONNX bundle; engine: bundle -> TensorRT engines (written into the bundle); "
    "open_clip: model -> a folder open_clip loads with local-dir:DIR"
)


def _given(ctx: click.Context) -> set[str]:
    """Options the user typed (not defaults), as CLI names."""
    return {
        p.opts[-1].lstrip("-")
        for p in ctx.command.params
        if isinstance(p, click.Option) and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE
    }


def export_options(**flags: Any) -> ExportOptions:
    """The ONNX export options from the command's flags, checked by the schema (errors name the flag)."""
    return from_dict(ExportOptions, flags, label="option", key_format=cli_name)


def engine_options(**flags: Any) -> EngineOptions:
    """The engine build options from the command's flags, checked by the schema (errors name the flag)."""
    return from_dict(EngineOptions, flags, label="option", key_format=engine_flag_name)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells])


def _builtin_teachers(*specs: Any) -> None:
    """`builtin:NAME` specs are trained by the compression core, which registers them with the resolver on import."""
    if any(str(s).startswith("builtin:") for s in specs if s):
        import tinyclip_edge.compress  # noqa: F401


def _io(spec: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}[{','.join(map(str, s['shape']))}]" for s in spec)


# Flag defaults come from the option schemas, so they cannot differ; --calib and --calib-count serve both schemas
# (tests/test_options.py checks that both defaults equal the one flag's).
_EXPORT = ExportOptions()
_ENGINE = EngineOptions()


@click.command("export")
@click.argument("source")
@click.option("--format", "fmt", default="onnx", show_default=True, help=_FORMAT_HELP)
@click.option("--out", type=click.Path(path_type=Path), help="[onnx, open_clip] directory to write")
@click.option(
    "--precision",
    help="onnx: fp32 (default) | fp16 | int8 | int8-dynamic | fp8; engine: fp32 | fp16 | int8 | fp8 (default: the "
    "bundle's)",
)
@click.option("--opset", type=int, default=_EXPORT.opset, show_default=True, help="[onnx] ONNX opset (14 to 23)")
@click.option(
    "--raw", is_flag=True, default=_EXPORT.raw, help="[onnx] output raw embeddings instead of L2-normalised ones"
)
@click.option(
    "--calib",
    default=_EXPORT.calib,
    help="calibration data for int8 and fp8 (e.g. scenes:calib or a CSV of real images); engine: only "
    "for implicit int8 from an fp32 bundle with TensorRT proper",
)
@click.option("--calib-count", type=int, default=_EXPORT.calib_count, show_default=True, help="calibration images")
@click.option(
    "--calib-method", default=_EXPORT.calib_method, show_default=True, help="[onnx] minmax | percentile | entropy"
)
@click.option(
    "--int8-keep",
    default=_EXPORT.int8_keep,
    show_default=True,
    help="[onnx] nodes kept float: auto (sensitivity search), none, or comma-separated name parts",
)
@click.option(
    "--int8-min-cosine",
    type=float,
    default=_EXPORT.int8_min_cosine,
    show_default=True,
    help="[onnx] target of the auto search (per tower, vs fp32, on calibration inputs), in (0, 1]",
)
@click.option(
    "--exporter",
    default=_EXPORT.exporter,
    show_default=True,
    help="[onnx] torchscript (opset <= 20) | dynamo (opset >= 18)",
)
@click.option(
    "--batch-profile",
    default=",".join(map(str, _ENGINE.batch_profile)),
    show_default=True,
    help="[engine] optimisation profile MIN,OPT,MAX (one N: a fixed batch); bench's --batch lists sizes to time",
)
@click.option("--batch", "old_batch", hidden=True, help="[engine] the old name of --batch-profile (deprecated)")
@click.option("--workspace", "workspace_mb", type=int, default=_ENGINE.workspace_mb, help="[engine] workspace in MiB")
@click.option("--dla", "dla_core", type=int, default=_ENGINE.dla_core, help="[engine] DLA core (Jetson)")
@click.option("--timing-cache", default=_ENGINE.timing_cache, help="[engine] timing cache file (read and updated)")
@click.option(
    "--calib-cache",
    default=_ENGINE.calib_cache,
    help="[engine] int8 calibration cache file (default: <tower>.calib.cache in the bundle)",
)
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.pass_context
def export_cmd(
    ctx: click.Context,
    source: str,
    fmt: str,
    out: Path | None,
    precision: str | None,
    batch_profile: str,
    old_batch: str | None,
    quiet: bool,
    **flags: Any,
) -> None:
    """Export SOURCE: a model directory / open_clip spec (--format onnx) or a bundle (--format engine)."""
    from ..export.formats import check_options, get_format, parse_batch_profile

    f, given = get_format(fmt), _given(ctx)
    check_options(f, given - {"format", "quiet"})
    if precision is not None and precision not in f.precisions:
        raise UserError(
            f"--precision {precision} is not available for --format {fmt}; choose from {', '.join(f.precisions)}"
        )
    if fmt == "engine":
        profile = parse_batch_profile(_renamed_batch(given, batch_profile, old_batch))
        _engine(Path(source), precision, engine_options(batch_profile=profile, **_fields_of(EngineOptions, flags)))
        return
    if out is None:
        raise UserError(f"--format {fmt} needs --out DIR (the directory to write)")
    _builtin_teachers(source)
    if fmt == "open_clip":
        _open_clip(source, out)
        return
    from ..export import export_bundle

    onnx = _fields_of(ExportOptions, flags)
    keep = onnx["int8_keep"]
    if keep not in ("auto", "none"):  # the flag is text: auto, none or comma-separated node-name parts
        onnx["int8_keep"] = [k.strip() for k in keep.split(",") if k.strip()]
    bundle = export_bundle(
        source, out, precision=precision or "fp32", options=export_options(**onnx), progress=not quiet
    )
    _print_bundle(bundle)


def _fields_of(schema: type, flags: dict[str, Any]) -> dict[str, Any]:
    """The flags that are fields of `schema` (export takes two: ExportOptions and EngineOptions)."""
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in flags.items() if k in names}


def _renamed_batch(given: set[str], batch_profile: str, old_batch: str | None) -> str:
    """--batch is --batch-profile's old name: still read, with a warning, because bench's --batch lists sizes."""
    if old_batch is None:
        return batch_profile
    if "batch-profile" in given:
        raise UserError("--batch is the old name of --batch-profile; pass only --batch-profile")
    click.echo(
        "warning: export --batch is deprecated and will be removed; use --batch-profile MIN,OPT,MAX "
        "(bench's --batch lists the sizes to time)",
        err=True,
    )
    return old_batch


def _print_bundle(bundle: Path) -> None:
    """The written bundle as a table: each tower's file, inputs, outputs, size and what its precision did."""
    from ..common.formats.bundle import BundleManifest

    m = BundleManifest.read(bundle)
    rows = []
    for tower, t in m.to_dict()["towers"].items():
        d = m.precision_details.get(tower, {})
        note = (
            f"{d['quantized_nodes']} {'fp8' if m.precision == 'fp8' else 'int8'}, {len(d['float_nodes'])} float"
            if "quantized_nodes" in d
            else f"fp32 ops: {','.join(d['fp32_ops'])}"
            if "fp32_ops" in d
            else ""
        )
        rows.append(
            {
                "tower": tower,
                "file": t["file"],
                "input": _io(t["inputs"]),
                "output": _io(t["outputs"]),
                "MB": f"{t['bytes'] / 1e6:.2f}",
                "notes": note,
            }
        )
    click.echo(_table(rows, ["tower", "file", "input", "output", "MB", "notes"]))
    click.echo(f"\n{m.precision} bundle (opset {m.opset}, normalized={m.normalized}) written to {bundle}")


def _open_clip(source: str, out: Path) -> None:
    from ..export.open_clip_dir import export_open_clip

    result = export_open_clip(source, out)
    click.echo(
        f"open_clip folder written to {result.path}: load it with "
        f"open_clip.create_model_and_transforms('local-dir:{result.path}')"
    )
    click.echo(
        f"parameters: student {result.params['student']:,}, open_clip {result.params['open_clip']:,}; "
        f"reloaded embeddings differ from the student's by at most {result.max_abs:.1e}"
    )
    for note in result.notes:
        click.echo(f"note: {note}")


_ENGINE_COLUMNS = ["tower", "engine", "library", "precision", "build_mode", "profile", "MiB", "build_seconds"]


def _engine(bundle: Path, precision: str | None, options: EngineOptions) -> None:
    from ..common.formats.bundle import BundleManifest

    manifest = BundleManifest.read(bundle)  # a clear error when SOURCE is not a bundle, before TensorRT loads
    try:
        from ..export.tensorrt import build_engines
    except ModuleNotFoundError as e:
        if e.name != "tinyclip_edge.export.tensorrt":
            raise
        raise UserError(
            "TensorRT engine building is not part of this installation (tinyclip_edge.export.tensorrt is missing)"
        ) from None
    engines = build_engines(bundle, options, precision=precision, manifest=manifest)
    rows = []
    for e in engines:
        row = dict(e)
        if isinstance(e.get("profile"), dict):
            row["profile"] = "/".join(str(e["profile"].get(k)) for k in ("min", "opt", "max"))
        if "size_bytes" in e:
            row["MiB"] = f"{e['size_bytes'] / 2**20:.1f}"
        rows.append(row)
    columns = [c for c in _ENGINE_COLUMNS if any(c in r for r in rows)] or list(
        dict.fromkeys(k for r in rows for k in r)
    )
    click.echo(_table(rows, columns))
    click.echo(f"\n{len(engines)} engine(s) written into {bundle}")


_PARITY = ParityOptions()  # flag defaults come from the option schema, so they cannot differ


@click.command("parity")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", help="PyTorch model to compare with (default: the bundle's source)")
@click.option("--teacher", help="teacher model dir or open_clip spec, for the compression view")
@click.option("--data", help="image-caption data (e.g. scenes:val or a CSV); without it, random tensors")
@click.option("--count", type=int, default=256, show_default=True, help="pairs to read from --data")
@click.option("--batch-size", type=int, default=_PARITY.batch_size, show_default=True)
@click.option(
    "--min-cosine",
    type=float,
    default=_PARITY.min_cosine,
    help=f"override the per-tower min cosine, in [-1, 1] (default: {tolerance_defaults('min_cosine')})",
)
@click.option(
    "--min-agreement",
    type=float,
    default=_PARITY.min_agreement,
    help="override the top-1 agreement threshold on confident queries, a fraction in [0, 1] "
    f"(default: {tolerance_defaults('min_agreement')})",
)
@click.option("--max-abs", type=float, default=_PARITY.max_abs, help="also require max abs error <= this")
@click.option(
    "--max-task-drop",
    type=float,
    default=_PARITY.max_task_drop,
    help="points of R@1 / zero-shot top-1 an artifact may significantly lose "
    f"(default: {tolerance_defaults('max_task_drop')})",
)
@click.option(
    "--agreement-margin",
    type=float,
    default=_PARITY.agreement_margin,
    help="agreement counts queries whose reference top-1 beats the "
    f"runner-up by more than this cosine gap (default {AGREEMENT_MARGIN:g})",
)
@click.option("--device", default=_PARITY.device, show_default=True, help="ONNX Runtime device: cpu | cuda | tensorrt")
@click.option(
    "--provider",
    default=_PARITY.provider,
    help="ONNX Runtime execution provider to run the ONNX graphs with (default "
    "CPUExecutionProvider, or what --device picks); overrides --device",
)
@click.option("--out", type=click.Path(path_type=Path), help="where parity.json/.md go (default: the bundle)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.pass_context
def parity_cmd(
    ctx: click.Context,
    bundle: Path,
    reference: str | None,
    teacher: str | None,
    data: str | None,
    count: int,
    out: Path | None,
    quiet: bool,
    **flags: Any,
) -> None:
    """Check every artifact of BUNDLE against PyTorch; exit 1 when a check fails."""
    from ..common.formats.bundle import PARITY_NAME
    from ..common.io import prepare_out_dir
    from ..export import run_parity
    from ..export.parity_report import output_names

    ParityOptions(**flags).validate_fields("")  # domains first, in the flags' words (click made them numbers)
    options = from_dict(ParityOptions, flags, label="option", key_format=cli_name)
    _builtin_teachers(reference, teacher)
    if out is not None or Path(bundle).is_dir():  # before the work (a bad BUNDLE gets run_parity's own message)
        prepare_out_dir(out or bundle, output_names(), "parity report", create=False)
    report = run_parity(
        bundle, options, reference=reference, teacher=teacher, data=data, count=count, progress=not quiet
    )
    out = out or bundle
    try:
        report.write(out)
    except OSError as e:
        raise UserError(f"cannot write the parity report to {out}: {e.strerror or e}") from None
    click.echo(report.to_markdown())
    failed = report.failures()
    if not report:
        click.echo(f"parity FAILED: {len(failed)} of {len(report.checks)} checks ({out / PARITY_NAME})", err=True)
        ctx.exit(1)
    click.echo(f"parity passed: {len(report.checks)} checks ({out / PARITY_NAME})")


COMMANDS: list[click.Command] = [export_cmd, parity_cmd]
