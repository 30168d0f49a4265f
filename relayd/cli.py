"""relayctl: the operator's command line for a running relayd (relayctl(1)).

This module holds the typer app, one function per command, and ``main()``.
How a command reaches relayd and what a failure means (exit codes 1, 2, 69)
is in ``relayd.cli_transport``; tables and units in ``relayd.cli_output``.

Exit codes: 0 success; 1 relayd refused (its ``detail`` on stderr);
2 usage error; 69 relayd cannot be reached; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from relayd import __version__, cli_status
from relayd.cli_output import (
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    count,
    draining_note,
    escape_message,
    fail,
    human_bytes,
    labelled,
    note,
    print_json,
    text,
)
from relayd.cli_params import JsonOption, PortArgument, check_port, need_command
from relayd.cli_send import send
from relayd.cli_tokens import tokens_app
from relayd.cli_transport import (
    DEFAULT_SOCKET,
    answer_object,
    call,
    make_target,
    target_of,
)
from relayd.cli_transport import tail as subscribe

app = typer.Typer(
    name="relayctl",
    help="Control a running relayd: its listener ports, access tokens and messages.",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
ports_app = typer.Typer(
    help="List, inspect, add and remove listener ports.",
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(ports_app, name="ports")
app.add_typer(tokens_app, name="tokens")


class Framing(StrEnum):
    """How a listener cuts a device's byte stream into messages."""

    lines = "lines"
    raw = "raw"
    delimiter = "delimiter"
    length = "length"
    fixed = "fixed"


class LengthPrefix(StrEnum):
    """The length prefix of framing ``length`` (relayd.toml(5))."""

    u8 = "u8"
    u16be = "u16be"
    u16le = "u16le"
    u32be = "u32be"
    u32le = "u32le"


class Parity(StrEnum):
    none = "none"
    even = "even"
    odd = "odd"


# --- commands --------------------------------------------------------------------

# Help texts carry their own defaults and ranges (show_default=False, no min/max):
# typer 0.15 escapes "[...]" in plain help and typer 0.29 renders types oddly.


def _check_ports(values: list[int] | None) -> list[int]:
    return [check_port(v) for v in values or []]


def _check_positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"{value} is less than 1")
    return value


def _source(ctx: typer.Context, name: str) -> str:
    """Where a parameter's value came from: COMMANDLINE, ENVIRONMENT, DEFAULT, …"""
    source = ctx.get_parameter_source(name)
    return "DEFAULT" if source is None else source.name


def _version(value: bool) -> None:
    if value:
        typer.echo(f"relayctl {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    *,
    socket: Annotated[
        str,
        typer.Option(
            "--socket",
            envvar="RELAYCTL_SOCKET",
            metavar="PATH",
            show_envvar=False,
            show_default=False,
            help=f"relayd's admin socket (default {DEFAULT_SOCKET}; env RELAYCTL_SOCKET).",
        ),
    ] = DEFAULT_SOCKET,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="RELAYCTL_URL",
            metavar="URL",
            show_envvar=False,
            show_default=False,
            help="relayd's HTTP port instead, e.g. http://127.0.0.1:8000; needs"
            " admin.token_file there and --token (env RELAYCTL_URL).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="RELAYCTL_TOKEN",
            metavar="TOKEN",
            show_envvar=False,
            show_default=False,
            help="Bearer token for --url (env RELAYCTL_TOKEN).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            show_default=False,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Control a running relayd: its listener ports, access tokens and messages."""
    if url is not None:
        socket_from = _source(ctx, "socket")
        url_from = _source(ctx, "url")
        if socket_from == url_from:  # both on the command line, or both in the environment
            hint = (
                "--socket / --url"
                if url_from == "COMMANDLINE"
                else "RELAYCTL_SOCKET / RELAYCTL_URL"
            )
            raise typer.BadParameter("give either a socket or a URL, not both", param_hint=hint)
        if socket_from == "COMMANDLINE":
            url = None  # --socket on the command line beats RELAYCTL_URL
    ctx.obj = make_target(socket, url, token, ctx.obj)
    need_command(ctx)


@ports_app.callback(invoke_without_command=True)
def ports(ctx: typer.Context) -> None:
    """List, inspect, add and remove listener ports."""
    need_command(ctx)


@app.command()
def status(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """Show relayd's state, version and counts, and its listener ports."""
    cli_status.status(target_of(ctx), as_json=as_json)


@ports_app.command("list")
def ports_list(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """List the listener ports with their counters."""
    cli_status.ports_list(target_of(ctx), as_json=as_json)


@ports_app.command("show")
def ports_show(ctx: typer.Context, port: PortArgument, *, as_json: JsonOption = False) -> None:
    """Show listener PORT (1-65535) in detail."""
    cli_status.ports_show(target_of(ctx), port, as_json=as_json)


@ports_app.command("add")
def ports_add(
    ctx: typer.Context,
    port: PortArgument,
    *,
    host: Annotated[
        str | None,
        typer.Option(
            metavar="HOST", show_default=False, help="Address to listen on (default 0.0.0.0)."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", show_default=False, help="A label, e.g. scale-4."),
    ] = None,
    framing: Annotated[
        Framing | None,
        typer.Option(
            metavar="lines|raw|delimiter|length|fixed",
            show_default=False,
            help="lines: a message per line (default); raw: a message per read; "
            "delimiter, length, fixed: see --delimiter, --length-prefix, --size.",
        ),
    ] = None,
    delimiter: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            show_default=False,
            help="With --framing delimiter: the bytes between messages, e.g. $'\\x03'.",
        ),
    ] = None,
    length_prefix: Annotated[
        LengthPrefix | None,
        typer.Option(
            metavar="u8|u16be|u16le|u32be|u32le",
            show_default=False,
            help="With --framing length: the prefix that counts each payload's bytes.",
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            callback=_check_positive,
            show_default=False,
            help="With --framing fixed: the bytes of each message.",
        ),
    ] = None,
    connect: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            show_default=False,
            help="Dial this device (a serial device server) instead of listening.",
        ),
    ] = None,
    serial: Annotated[
        str | None,
        typer.Option(
            metavar="DEV",
            show_default=False,
            help="Read this serial line (e.g. /dev/ttyUSB0) instead of listening.",
        ),
    ] = None,
    baudrate: Annotated[
        int | None,
        typer.Option(
            metavar="N", callback=_check_positive, show_default=False, help="Default 9600."
        ),
    ] = None,
    bytesize: Annotated[
        int | None,
        typer.Option(metavar="5|6|7|8", show_default=False, help="Default 8."),
    ] = None,
    parity: Annotated[
        Parity | None,
        typer.Option(metavar="none|even|odd", show_default=False, help="Default none."),
    ] = None,
    stopbits: Annotated[
        int | None,
        typer.Option(metavar="1|2", show_default=False, help="Default 1."),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            callback=_check_positive,
            show_default=False,
            help="Devices connected at once (default 64).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Open listener PORT (1-65535) now, or a --connect or --serial source; it persists."""
    target = target_of(ctx)
    body: dict[str, Any] = {"port": port}
    if host is not None:
        body["host"] = host
    if name is not None:
        body["name"] = name
    if framing is not None:
        body["framing"] = framing.value
    if delimiter is not None:
        body["delimiter"] = delimiter
    if length_prefix is not None:
        body["length_prefix"] = length_prefix.value
    if parity is not None:
        body["parity"] = parity.value
    optional = {"size": size, "connect": connect, "serial": serial, "baudrate": baudrate}
    optional |= {"bytesize": bytesize, "stopbits": stopbits}
    body |= {key: value for key, value in optional.items() if value is not None}
    if max_connections is not None:
        body["max_connections"] = max_connections
    response = call(target, "POST", "/v1/ports", body=body)
    if as_json:
        print_json(response.text)
        return
    p = answer_object(target, response)
    name_part = f" ({text(p['name'])})" if p.get("name") else ""
    typer.echo(f"port {text(p.get('port', port))} {text(p.get('state'))}{name_part}")


@ports_app.command("remove")
def ports_remove(
    ctx: typer.Context,
    port: PortArgument,
    *,
    force: Annotated[
        bool,
        typer.Option(
            "--force", show_default=False, help="Close the devices' connections without a drain."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Drain and close listener PORT; print its final counters."""
    target = target_of(ctx)
    if not force:
        # The drain can take drain.timeout: say so first (on stderr), once the port
        # is known to exist, so an unknown port is still one line and exit 1.
        p = answer_object(target, call(target, "GET", f"/v1/ports/{port}"))
        info = answer_object(target, call(target, "GET", "/v1/status"))
        note(draining_note(p, info.get("drain_timeout")))
    params = {"force": "true"} if force else None
    response = call(target, "DELETE", f"/v1/ports/{port}", params=params, patient=True)
    if as_json:
        print_json(response.text)
        return
    p = answer_object(target, response)
    messages = count(p.get("messages_received"))
    received = human_bytes(count(p.get("bytes_received")))
    typer.echo(f"{labelled(p)} removed: {messages} messages, {received} received")


@app.command()
def reload(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """Re-read relayd's config file and apply its [[ports]] (like systemctl reload)."""
    target = target_of(ctx)
    response = call(target, "POST", "/v1/reload", patient=True)
    result = answer_object(target, response)
    if as_json:
        print_json(response.text)
    else:
        changes = [
            f"{key} {', '.join(str(p) for p in result[key])}"
            for key in ("added", "removed", "changed")
            if isinstance(result.get(key), list) and result[key]
        ]
        typer.echo(f"reloaded: {'; '.join(changes) if changes else 'no changes'}")
    failed = result.get("failed")
    if isinstance(failed, list) and failed:
        for item in failed:
            port, detail = (
                (item.get("port"), item.get("detail")) if isinstance(item, dict) else (None, item)
            )
            line = str(detail or "failed")
            if port is not None and not line.startswith(f"port {port}"):
                line = f"port {port}: {line}"
            note(line)
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def tail(
    ctx: typer.Context,
    *,
    port: Annotated[
        list[int] | None,
        typer.Option(
            "--port",
            "-p",
            metavar="PORT",
            callback=_check_ports,
            show_default=False,
            help="Only this port; repeat for more (default: every port).",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            show_default=False,
            help="Print JSON envelopes (port, name, peer, ts, epoch, seq, data).",
        ),
    ] = False,
    last: Annotated[
        int,
        typer.Option(
            "--last",
            "-n",
            metavar="N",
            min=0,
            max=1_000_000,
            show_default=False,
            help="First print the last N kept messages of each port (relay.history).",
        ),
    ] = 0,
) -> None:
    """Print relayed messages as they arrive, one per line, until Ctrl-C.

    Control characters and non-UTF-8 bytes are shown escaped (\\n, \\x1b);
    use --json for the exact data.
    """
    target = target_of(ctx)
    query = [("port", str(p)) for p in port or []]
    if as_json:
        query.append(("format", "json"))
    if last:
        query.append(("last", str(last)))
    path = "/ws" + ("?" + urlencode(query) if query else "")
    try:
        code, message = subscribe(target, path, _print_message)
    except BrokenPipeError:  # `relayctl tail | head`: the reader has what it wanted
        _silence_stdout()
        raise typer.Exit(0) from None
    fail(message, code)


app.command("send")(send)


def _print_message(message: str | bytes) -> None:
    print(escape_message(message), flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout (tests)
        pass


# --- entry point -----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The ``relayctl`` console script: run the app, turn every outcome into an exit code."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:  # never fail on a character the terminal cannot show
            reconfigure(errors="backslashreplace")
    try:
        # Standalone mode: typer prints usage errors (exit 2) and turns Ctrl-C into
        # exit 130 and typer.Exit into its code, all by raising SystemExit.
        app(args=argv, prog_name="relayctl")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug in relayctl: still one line, no traceback
        typer.echo(f"relayctl: unexpected error: {type(exc).__name__}: {exc}", err=True)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
