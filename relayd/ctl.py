"""The ``relayctl`` console script: a quick path for the read-only commands.

``relayctl status``, ``ports list`` and ``ports show PORT`` (with ``--json``,
``--socket PATH`` or ``RELAYCTL_SOCKET``) are what scripts and monitoring run
again and again; importing typer alone takes longer than their request
(typer 0.29 also builds pydantic adapters for the option values, typer 0.15
imports rich). When the command line is exactly one of those forms, this
module runs the command's code from ``relayd.cli_status`` directly, without
typer; everything else - help, ``--version``, ``--url``, every other command,
any option or spelling it does not know, and every usage error - goes to the
typer app in ``relayd.cli``, which defines relayctl's command line
(relayctl(1)). Output, errors and exit codes are the same either way: the
quick path only recognises argument lists that typer parses the same way.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from relayd.cli_output import EXIT_INTERRUPTED, EXIT_REFUSED, echo

Command = Callable[[], None]

# A port as typer/click would read it and accept it (1-65535, plain digits).
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def _socket(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """The admin socket the global options name, and the arguments after them."""
    socket = os.environ.get("RELAYCTL_SOCKET")
    if socket == "" or "RELAYCTL_URL" in os.environ or "_RELAYCTL_COMPLETE" in os.environ:
        return None  # an empty variable, a URL, shell completion: let typer decide
    if argv and argv[0] == "--socket":
        if len(argv) < 2 or not argv[1] or argv[1].startswith("-"):
            return None
        socket, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--socket="):
        socket, argv = argv[0].removeprefix("--socket="), argv[1:]
        if not socket:
            return None
    return socket, argv


def quick_command(argv: Sequence[str]) -> Command | None:
    """The command to run without typer, or None when typer must parse ``argv``."""
    found = _socket(list(argv))
    if found is None:
        return None
    socket, rest = found
    as_json = rest.count("--json") == 1
    words = [arg for arg in rest if arg != "--json"]
    if len(words) + as_json != len(rest) or not words or words[0] not in ("status", "ports"):
        return None
    if words[0] == "status" and (rest[0] != "status" or len(words) != 1):
        return None
    if words[0] == "ports" and (rest[:2] != words[:2] or len(words) < 2):
        return None  # "ports" and its command come first, then --json anywhere

    from relayd import cli_status
    from relayd.cli_transport import DEFAULT_SOCKET, Target

    target = Target(socket=socket or DEFAULT_SOCKET)
    if words == ["status"]:
        return lambda: cli_status.status(target, as_json=as_json)
    if words == ["ports", "list"]:
        return lambda: cli_status.ports_list(target, as_json=as_json)
    if len(words) == 3 and words[1] == "show" and _PORT.fullmatch(words[2]):
        port = int(words[2])
        if port <= 65535:
            return lambda: cli_status.ports_show(target, port, as_json=as_json)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv`` (default: the process's arguments); return relayctl's exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = quick_command(args)
    if command is None:
        from relayd import cli

        return cli.main(args)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:  # never fail on a character the terminal cannot show
            reconfigure(errors="backslashreplace")
    try:
        command()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            return _unexpected(exc)
        # `relayctl status | head -0`: exit 1 without a word, as typer does.
        _silence(sys.stdout)
        return EXIT_REFUSED
    except Exception as exc:
        typer = sys.modules.get("typer")
        if typer is not None and isinstance(exc, typer.Exit):  # after a typer.echo
            code: int = exc.exit_code
            return code
        return _unexpected(exc)
    return 0


def _unexpected(exc: Exception) -> int:
    """A bug in relayctl: still one line, no traceback."""
    echo(f"relayctl: unexpected error: {type(exc).__name__}: {exc}", err=True)
    return EXIT_REFUSED


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null: the exit-time flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real descriptor behind it (tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
