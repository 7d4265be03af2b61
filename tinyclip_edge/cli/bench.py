"""`tinyclip-edge bench`: latency (and on a Jetson, energy) of several artifacts, interleaved."""

from __future__ import annotations

import typing

import click

from ..common.errors import UserError
from ..common.options import Backend, BenchOptions, Tower, cli_name
from ..common.typed import from_dict

_BENCH = BenchOptions()  # flag defaults come from the option schema, so they cannot differ


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]  # an empty item ("1,,2") is a typo, not a skip
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise UserError(f"--batch must be comma-separated positive integers such as 1,8,32, not {text!r}")
    return batches


def bench_options(**flags: typing.Any) -> BenchOptions:
    """The bench options from the command's flags, checked by the schema (errors name the flag)."""
    return from_dict(
        BenchOptions,
        flags,
        label="option",
        key_format=lambda k: (
            "--batch" if k == "batches" else "--power-interval" if k == "power_interval_ms" else cli_name(k)
        ),
    )


@click.command("bench")
@click.argument("targets", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option(
    "--batch",
    "batches",
    default=",".join(map(str, _BENCH.batches)),
    show_default=True,
    help="Batch sizes, comma-separated (1,8,32).",
)
@click.option("--tower", type=click.Choice(typing.get_args(Tower)), default=_BENCH.tower, show_default=True)
@click.option("--device", default=_BENCH.device, show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--iters",
    type=int,
    default=_BENCH.iters,
    help="Timed repetitions per artifact, tower and batch, >= 2 (default 20).",
)
@click.option(
    "--seconds", type=float, default=_BENCH.seconds, help="Run each cell at least this long per artifact instead."
)
@click.option(
    "--warmup",
    type=int,
    default=_BENCH.warmup,
    show_default=True,
    help="Untimed calls first (memory is measured here).",
)
@click.option(
    "--end-to-end",
    is_flag=True,
    default=_BENCH.end_to_end,
    help="Include preprocessing PIL images and tokenising strings.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default bench/<date-time>).")
@click.option(
    "--backend",
    type=click.Choice(typing.get_args(Backend)),
    default=_BENCH.backend,
    help="Force a runtime (e.g. trt for a bundle with engines); default: picked per artifact.",
)
@click.option(
    "--precision",
    default=_BENCH.precision,
    help="Precision for PyTorch model dirs (fp32/fp16/bf16); engines and ONNX are fixed.",
)
@click.option("--threads", type=int, default=_BENCH.threads, help="CPU threads for PyTorch and ONNX Runtime.")
@click.option(
    "--power/--no-power", default=_BENCH.power, help="Sample tegrastats for energy per item (default: if present)."
)
@click.option(
    "--power-interval",
    "power_interval_ms",
    type=int,
    default=_BENCH.power_interval_ms,
    show_default=True,
    help="tegrastats interval in ms.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench(
    targets: tuple[str, ...],
    batches: str,
    tower: str,
    device: str,
    iters: int | None,
    seconds: float | None,
    warmup: int,
    end_to_end: bool,
    out: str | None,
    backend: str | None,
    precision: str | None,
    threads: int | None,
    power: bool | None,
    power_interval_ms: int,
    quiet: bool,
) -> None:
    """Time ARTIFACT... (model dirs, ONNX bundles, .engine files) side by side; ratios are against the first.

    Writes bench.json, bench.csv, bench.md and bench.png into --out and prints the table.
    """
    from ..runtimes.bench import default_out_dir, run_bench

    options = bench_options(
        batches=parse_batches(batches),
        tower=tower,
        device=device,
        iters=iters,
        seconds=seconds,
        warmup=warmup,
        end_to_end=end_to_end,
        backend=backend,
        threads=threads,
        precision=precision,
        power=power,
        power_interval_ms=power_interval_ms,
    )
    out_dir = out or default_out_dir()
    report = run_bench(list(targets), options, out_dir=out_dir, progress=not quiet)
    click.echo(report.table())
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo("wrote " + ", ".join(str(p) for p in report.written.values()))


COMMANDS = [bench]
