"""Commands of the compression core: compress, run, quickstart, eval, info."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
