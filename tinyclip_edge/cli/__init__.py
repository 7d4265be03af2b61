"""The `tinyclip-edge` command line. Commands parse options and call library functions, nothing more.

Each command group lives in its own module; this module wires them together and turns user errors
into one line on stderr and a non-zero exit (no traceback).
"""

from __future__ import annotations

import click

from .. import __version__
from ..common.errors import UserError


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full disk or a permission problem outside the atomic writers (e.g. appending logs)
            from ..common.io import write_error

            err = write_error(e, e.filename or ".")
            if err is None:
                raise
            where = f" while writing {e.filename}" if e.filename else ""
            raise click.ClickException(f"{err.reason}{where}; {err.hint}") from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyclip-edge")
def main() -> None:
    """Compress CLIP into small, fast students and ship them to the edge."""


def _register() -> None:
    from . import bench, data, export, regions, train

    for cmd in train.COMMANDS + export.COMMANDS + bench.COMMANDS + data.COMMANDS + regions.COMMANDS:
        main.add_command(cmd)


_register()
