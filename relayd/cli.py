"""relayctl: the operator's command line for a running relayd (spec §8).

Every command is one request to the admin API (spec §7), over the admin Unix
socket by default or over ``--url`` with a bearer token. ``tail`` subscribes
to ``/ws`` on the same socket or address.

Exit codes: 0 success; 1 relayd refused (its ``detail`` on stderr);
2 usage error; 69 relayd cannot be reached; 130 interrupted (Ctrl-C).

The network below httpx is replaceable: pass ``obj=httpx.MockTransport(...)``
to ``typer.testing.CliRunner.invoke`` and every request goes to it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn
from urllib.parse import urlencode

import httpx
import typer
from websockets.asyncio.client import connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from relayd import __version__

DEFAULT_SOCKET = "/run/relayd/admin.sock"

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_INTERRUPTED = 130

# Most answers are immediate; removing a port and reloading wait for drains,
# whose length is the daemon's drain.timeout, so they wait as long as it takes.
QUICK = httpx.Timeout(30.0, connect=5.0)
PATIENT = httpx.Timeout(None, connect=5.0)

# websockets logs through this logger; the NullHandler keeps Python's
# last-resort handler from printing its warnings (and tracebacks) to the user.
logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

app = typer.Typer(
    name="relayctl",
    help="Control a running relayd: list, add and remove listener ports, tail messages.",
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


class Framing(StrEnum):
    """How a listener cuts a device's byte stream into messages."""

    lines = "lines"
    raw = "raw"


@dataclass(frozen=True)
class Target:
    """Where relayd is (the global options) and how to reach it."""

    socket: str = DEFAULT_SOCKET
    url: str | None = None
    token: str | None = None
    transport: httpx.BaseTransport | None = None

    @property
    def address(self) -> str:
        return self.url if self.url is not None else self.socket

    def client(self) -> httpx.Client:
        headers = {"Accept": "application/json", "User-Agent": f"relayctl/{__version__}"}
        if self.url is None:
            transport = self.transport or httpx.HTTPTransport(uds=self.socket)
            return httpx.Client(
                base_url="http://relayd", transport=transport, headers=headers, timeout=QUICK
            )
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.Client(
            base_url=self.url, transport=self.transport, headers=headers, timeout=QUICK
        )


# --- output helpers -------------------------------------------------------------


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    """Print one ``relayctl: …`` line on stderr and exit with ``code``."""
    typer.echo(f"relayctl: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


_BYTE_ESCAPES = [
    chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in range(256)
]  # printable ASCII stays, the rest is \xNN, as in a bytes repr
_BYTE_ESCAPES[0x5C] = "\\\\"
_BYTE_ESCAPES[0x09] = "\\t"
_BYTE_ESCAPES[0x0A] = "\\n"
_BYTE_ESCAPES[0x0D] = "\\r"

_TEXT_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_TEXT_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def escape_bytes(data: bytes) -> str:
    """Show bytes as one printable line: ASCII as is, the rest escaped like a bytes repr."""
    return "".join([_BYTE_ESCAPES[b] for b in data])


def escape_text(text: str) -> str:
    """Escape control characters so a message stays on one line and cannot drive a terminal."""
    return text.translate(_TEXT_ESCAPES)


def human_bytes(n: int) -> str:
    """1234 -> '1.2 KiB' (binary units; below 1 KiB the exact count)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(seconds: float) -> str:
    """93784 -> '1d 2h' (the two largest units), 59 -> '59s'."""
    s = max(0, int(seconds))
    parts: list[str] = []
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2])


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
    """Columns separated by two spaces; the columns in ``right`` are right-aligned."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _text(value: Any) -> str:
    return "-" if value is None else escape_text(str(value))


def _count(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


PORT_COLUMNS = ("PORT", "NAME", "HOST", "FRAMING", "STATE", "SOURCE", "CONNS", "MESSAGES", "BYTES")


def ports_table(ports: list[dict[str, Any]]) -> str:
    rows = [
        (
            _text(p.get("port")),
            _text(p.get("name")),
            _text(p.get("host")),
            _text(p.get("framing")),
            _text(p.get("state")),
            _text(p.get("source")),
            str(_count(p.get("connections"))),
            str(_count(p.get("messages_received"))),
            human_bytes(_count(p.get("bytes_received"))),
        )
        for p in ports
    ]
    return table(PORT_COLUMNS, rows, right={0, 6, 7, 8})


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in pairs)


def _labelled(port: dict[str, Any]) -> str:
    name = port.get("name")
    return f"port {_text(port.get('port'))}" + (f" ({_text(name)})" if name else "")


# --- talking to relayd ------------------------------------------------------------


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (httpx wraps it in one or two layers)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def unreachable(target: Target, exc: BaseException) -> NoReturn:
    os_error = _os_error(exc)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        reason = "timed out"
    elif os_error is not None and os_error.errno:
        reason = os.strerror(os_error.errno)  # asyncio's strerror also names the address
    else:
        reason = str(exc) or type(exc).__name__
    denied = os_error is not None and os_error.errno in (errno.EACCES, errno.EPERM)
    hint = "are you in the relayd group?" if denied else "is relayd running?"
    fail(f"cannot reach relayd at {target.address}: {reason} ({hint})", EXIT_UNAVAILABLE)


def detail_of(status: int, reason: str, body: bytes | bytearray) -> str:
    """The daemon's one-sentence ``detail``, or the HTTP status when there is none."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if isinstance(detail, list):  # a framework's list of validation errors
        detail = "; ".join(str(d.get("msg", d) if isinstance(d, dict) else d) for d in detail)
    if isinstance(detail, str) and detail.strip():
        return detail
    return f"HTTP {status} {reason}".strip()


def call(
    target: Target,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    timeout: httpx.Timeout = QUICK,
) -> httpx.Response:
    """One admin API request; exits 69 when relayd cannot be reached, 1 when it refuses."""
    try:
        with target.client() as client:
            response = client.request(method, path, json=body, params=params, timeout=timeout)
    except (httpx.TransportError, OSError) as exc:
        unreachable(target, exc)
    if response.is_error:
        detail = detail_of(response.status_code, response.reason_phrase, response.content)
        if target.url is not None and response.status_code == 404 and detail == "Not Found":
            detail += f" ({target.url} does not serve the admin API; is admin.token_file set?)"
        fail(detail)
    return response


def answer(target: Target, response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        fail(f"unexpected answer from relayd at {target.address}: not JSON")


def answer_object(target: Target, response: httpx.Response) -> dict[str, Any]:
    value = answer(target, response)
    if not isinstance(value, dict):
        fail(f"unexpected answer from relayd at {target.address}: not a JSON object")
    return value


def print_json(response: httpx.Response) -> None:
    """The API's JSON exactly as it came."""
    typer.echo(response.text, nl=not response.text.endswith("\n"))


def target_of(ctx: typer.Context) -> Target:
    target = ctx.find_object(Target)
    if target is None:  # pragma: no cover - the root callback always sets it
        raise RuntimeError("relayctl: no target in the context")
    return target


def _need_command(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(EXIT_USAGE)


# --- commands --------------------------------------------------------------------

# Help texts carry their own defaults and ranges (show_default=False, no min/max):
# typer 0.15 escapes "[...]" in plain help and typer 0.29 renders types oddly.


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise typer.BadParameter(f"{value} is not a port number (1-65535)")
    return value


def _check_ports(values: list[int] | None) -> list[int]:
    return [_check_port(v) for v in values or []]


def _check_positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"{value} is less than 1")
    return value


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON unchanged.", show_default=False)
]
PortArgument = Annotated[
    int, typer.Argument(metavar="PORT", callback=_check_port, show_default=False, hidden=True)
]  # hidden: the "[required]" line; each docstring says what PORT is


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
    """Control a running relayd: list, add and remove listener ports, tail messages."""
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
    if url is not None:
        url = url.rstrip("/")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise typer.BadParameter(str(exc), param_hint="--url") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise typer.BadParameter(
                "must be an http:// or https:// URL, e.g. http://127.0.0.1:8000",
                param_hint="--url",
            )
    injected = ctx.obj if isinstance(ctx.obj, httpx.BaseTransport) else None
    ctx.obj = Target(socket=socket, url=url, token=token or None, transport=injected)
    _need_command(ctx)


@ports_app.callback(invoke_without_command=True)
def ports(ctx: typer.Context) -> None:
    """List, inspect, add and remove listener ports."""
    _need_command(ctx)


@app.command()
def status(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """Show relayd's state, version and counts, and its listener ports."""
    target = target_of(ctx)
    response = call(target, "GET", "/v1/status")
    if as_json:
        print_json(response)
        return
    info = answer_object(target, response)
    port_list = _port_list(target, call(target, "GET", "/v1/ports"))
    typer.echo(
        key_values(
            [
                ("state", _text(info.get("state"))),
                ("version", _text(info.get("version"))),
                ("pid", _text(info.get("pid"))),
                ("uptime", human_duration(_seconds(info.get("uptime_s")))),
                ("http", _text(info.get("http"))),
                ("ports", str(_count(info.get("ports")))),
                ("tcp connections", str(_count(info.get("tcp_connections")))),
                ("ws clients", str(_count(info.get("ws_clients")))),
            ]
        )
    )
    if port_list:
        typer.echo()
        typer.echo(ports_table(port_list))


def _port_list(target: Target, response: httpx.Response) -> list[dict[str, Any]]:
    value = answer(target, response)
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        fail(f"unexpected answer from relayd at {target.address}: not a list of ports")
    return value


@ports_app.command("list")
def ports_list(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """List the listener ports with their counters."""
    target = target_of(ctx)
    response = call(target, "GET", "/v1/ports")
    if as_json:
        print_json(response)
        return
    port_list = _port_list(target, response)
    typer.echo(ports_table(port_list) if port_list else "no listener ports")


@ports_app.command("show")
def ports_show(ctx: typer.Context, port: PortArgument, *, as_json: JsonOption = False) -> None:
    """Show listener PORT (1-65535) in detail."""
    target = target_of(ctx)
    response = call(target, "GET", f"/v1/ports/{port}")
    if as_json:
        print_json(response)
        return
    p = answer_object(target, response)
    received = _count(p.get("bytes_received"))
    typer.echo(
        key_values(
            [
                ("port", _text(p.get("port"))),
                ("name", _text(p.get("name"))),
                ("host", _text(p.get("host"))),
                ("framing", _text(p.get("framing"))),
                ("max connections", _text(p.get("max_connections"))),
                ("state", _text(p.get("state"))),
                ("source", _text(p.get("source"))),
                ("connections", str(_count(p.get("connections")))),
                ("messages", str(_count(p.get("messages_received")))),
                ("bytes", f"{human_bytes(received)} ({received})"),
            ]
        )
    )


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
            metavar="lines|raw",
            show_default=False,
            help="lines: a message per line (default); raw: a message per read.",
        ),
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
    """Open listener PORT (1-65535) now; it persists across restarts."""
    target = target_of(ctx)
    body: dict[str, Any] = {"port": port}
    if host is not None:
        body["host"] = host
    if name is not None:
        body["name"] = name
    if framing is not None:
        body["framing"] = framing.value
    if max_connections is not None:
        body["max_connections"] = max_connections
    response = call(target, "POST", "/v1/ports", body=body)
    if as_json:
        print_json(response)
        return
    p = answer_object(target, response)
    name_part = f" ({_text(p['name'])})" if p.get("name") else ""
    typer.echo(f"port {_text(p.get('port', port))} {_text(p.get('state'))}{name_part}")


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
    params = {"force": "true"} if force else None
    response = call(target, "DELETE", f"/v1/ports/{port}", params=params, timeout=PATIENT)
    if as_json:
        print_json(response)
        return
    p = answer_object(target, response)
    messages = _count(p.get("messages_received"))
    received = human_bytes(_count(p.get("bytes_received")))
    typer.echo(f"{_labelled(p)} removed: {messages} messages, {received} received")


@app.command()
def reload(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """Re-read relayd's config file and apply its [[ports]] (like systemctl reload)."""
    target = target_of(ctx)
    response = call(target, "POST", "/v1/reload", timeout=PATIENT)
    result = answer_object(target, response)
    if as_json:
        print_json(response)
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
            typer.echo(f"relayctl: {' '.join(line.split())}", err=True)
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
            "--json", show_default=False, help="Print JSON envelopes (port, name, peer, ts, data)."
        ),
    ] = False,
) -> None:
    """Print relayed messages as they arrive, one per line, until Ctrl-C.

    Control characters and non-UTF-8 bytes are shown escaped (\\n, \\x1b);
    use --json for the exact data.
    """
    target = target_of(ctx)
    query = [("port", str(p)) for p in port or []]
    if as_json:
        query.append(("format", "json"))
    path = "/ws" + ("?" + urlencode(query) if query else "")
    try:
        code, message = asyncio.run(_tail(target, path))
    except BrokenPipeError:  # `relayctl tail | head`: the reader has what it wanted
        _silence_stdout()
        raise typer.Exit(0) from None
    fail(message, code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout (tests)
        pass


_CLOSE_NAMES: dict[int, str] = {
    CloseCode.NORMAL_CLOSURE: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.SERVICE_RESTART: "service restart",
    CloseCode.TRY_AGAIN_LATER: "try again later",
}


def closed_message(target: Target, exc: ConnectionClosed) -> tuple[int, str]:
    """What to say and which exit code to use when relayd ends a subscription."""
    close = exc.rcvd
    if close is None:
        return EXIT_UNAVAILABLE, f"lost the connection to relayd at {target.address}"
    if close.code in (CloseCode.POLICY_VIOLATION, CloseCode.TRY_AGAIN_LATER):
        return EXIT_REFUSED, close.reason or f"relayd refused the subscription (code {close.code})"
    name = _CLOSE_NAMES.get(close.code, f"code {close.code}")
    why = f"{name}: {close.reason}" if close.reason else name
    return EXIT_UNAVAILABLE, f"relayd closed the connection ({why})"


async def _tail(target: Target, path: str) -> tuple[int, str]:
    """Print messages until relayd ends the subscription; return (exit code, why)."""
    try:
        async with _subscribe(target, path) as ws:
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosed as exc:
                    return closed_message(target, exc)
                line = escape_bytes(message) if isinstance(message, bytes) else escape_text(message)
                print(line, flush=True)
    except InvalidStatus as exc:
        response = exc.response
        return EXIT_REFUSED, detail_of(response.status_code, response.reason_phrase, response.body)
    except BrokenPipeError:  # our stdout, not the connection
        raise
    except (OSError, TimeoutError, WebSocketException) as exc:
        unreachable(target, exc)


def _subscribe(target: Target, path: str) -> connect:
    if target.url is None:
        return unix_connect(
            target.socket,
            uri=f"ws://relayd{path}",
            compression=None,
            max_size=None,
            close_timeout=2,
            user_agent_header=f"relayctl/{__version__}",
            logger=logger,
        )
    scheme, rest = target.url.split("://", 1)
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else None
    return connect(
        f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}",
        additional_headers=headers,
        compression=None,
        max_size=None,
        close_timeout=2,
        user_agent_header=f"relayctl/{__version__}",
        logger=logger,
    )


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
