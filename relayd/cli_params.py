"""relayctl's shared typer parameters: ``--json``, a PORT argument, a group's help.

These need typer at import time, so they live apart from ``relayd.cli_output``,
which the quick commands of ``relayd.ctl`` use without typer.
"""

from __future__ import annotations

from typing import Annotated

import typer

from relayd.cli_output import EXIT_USAGE

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON unchanged.", show_default=False)
]


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise typer.BadParameter(f"{value} is not a port number (1-65535)")
    return value


PortArgument = Annotated[
    int, typer.Argument(metavar="PORT", callback=check_port, show_default=False, hidden=True)
]  # hidden: the "[required]" line; each docstring says what PORT is


def need_command(ctx: typer.Context) -> None:
    """A group called without a command: its help on stderr, and a usage error."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(EXIT_USAGE)
