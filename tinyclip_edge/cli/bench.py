"""`tinyclip-edge bench`: latency (and on a Jetson, energy) of several artifacts, interleaved."""

from __future__ import annotations

import click

from ..common.errors import UserError


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise UserError(f"--batch must be comma-separated positive integers such as 1,8,32, not {text!r}")
    return batches


@click.command("bench")
@click.argument("targets", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("--batch", "batch", default="1", show_default=True, help="Batch sizes, comma-separated (1,8,32).")
@click.option("--tower", type=click.Choice(["image", "text", "both"]), default="both", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--iters", type=int, help="Timed repetitions per artifact, tower and batch (default 20).")
@click.option("--seconds", type=float, help="Run each cell at least this long per artifact instead.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed calls first (memory is measured here).")
@click.option("--end-to-end", is_flag=True, help="Include preprocessing PIL images and tokenising strings.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default bench/<date-time>).")
@click.option("--backend", type=click.Choice(["pyt", "onnxrt", "trt"]),
              help="Force a runtime (e.g. trt for a bundle with engines); default: picked per artifact.")
@click.option("--precision", help="Precision for PyTorch model dirs (fp32/fp16/bf16); engines and ONNX are fixed.")
@click.option("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime.")
@click.option("--power/--no-power", default=None, help="Sample tegrastats for energy per item (default: if present).")
@click.option("--power-interval", type=int, default=100, show_default=True, help="tegrastats interval in ms.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench(targets: tuple[str, ...], batch: str, tower: str, device: str, iters: int | None, seconds: float | None,
          warmup: int, end_to_end: bool, out: str | None, backend: str | None, precision: str | None,
          threads: int | None, power: bool | None, power_interval: int, quiet: bool) -> None:
    """Time ARTIFACT... (model dirs, ONNX bundles, .engine files) side by side; ratios are against the first.

    Writes bench.json, bench.csv, bench.md and bench.png into --out and prints the table.
    """
    from ..runtimes.bench import default_out_dir, run_bench

    out_dir = out or default_out_dir()
    report = run_bench(list(targets), batches=parse_batches(batch), tower=tower, device=device, iters=iters,
                       seconds=seconds, warmup=warmup, end_to_end=end_to_end, out_dir=out_dir, backend=backend,
                       threads=threads, precision=precision, power=power, power_interval_ms=power_interval,
                       progress=not quiet)
    click.echo(report.table())
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo("wrote " + ", ".join(str(p) for p in report.written.values()))


COMMANDS = [bench]
