"""relayctl's output: exit codes, one-line errors, tables and human units.

Everything here is formatting and printing (``fail`` prints one line and
exits); none of it talks to relayd, and none of it imports typer (``relayctl
status`` runs without it, see ``relayd.ctl``; the typer parameters are in
``relayd.cli_params``). The exit codes are relayctl(1)'s EXIT STATUS: 0
success; 1 relayd refused (its ``detail`` on stderr); 2 usage error; 69 relayd
cannot be reached; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from relayd.parsing import ports_from_json, ports_text

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    """Print one ``relayctl: …`` line on stderr and exit with ``code``."""
    note(message)
    leave(code)


def leave(code: int) -> NoReturn:
    """End the command with exit ``code``: typer's ``Exit`` inside the typer app.

    The quick commands of ``relayd.ctl`` run without typer: there it is a
    ``SystemExit``, which ``relayd.ctl.main`` turns into the exit code.
    """
    typer = sys.modules.get("typer")
    if typer is not None:
        raise typer.Exit(code)
    raise SystemExit(code)


def note(message: str) -> None:
    """Print one ``relayctl: …`` line on stderr and go on: progress, not a failure.

    The message often carries relayd's ``detail`` or a name an operator or a
    device chose: control characters are escaped, so it stays one line and
    cannot drive the terminal, whether stderr is one or not.
    """
    echo(f"relayctl: {escape_text(' '.join(message.split()))}", err=True)


def echo(message: str, *, err: bool = False, nl: bool = True) -> None:
    """``typer.echo`` without importing typer where the result is the same.

    click's echo writes the text and flushes; it differs from a plain write when
    the text has an escape sequence (stripped when the stream is no terminal) or
    when the stream's encoding is not UTF-8 (click may re-wrap it). Those cases
    still go to typer.echo, so the output is the same either way.
    """
    stream = sys.stderr if err else sys.stdout
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    if "\x1b" in message or not (message.isascii() or encoding == "utf8"):
        import typer

        typer.echo(message, err=err, nl=nl)
        return
    stream.write(message + "\n" if nl else message)
    stream.flush()


def print_json(body: str) -> None:
    """The API's JSON exactly as it came."""
    echo(body, nl=not body.endswith("\n"))


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


def escape_message(message: str | bytes) -> str:
    """One relayed message (a WebSocket text or binary frame) as one printable line."""
    return escape_bytes(message) if isinstance(message, bytes) else escape_text(message)


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


def text(value: Any) -> str:
    """A field of relayd's answer as escaped text; ``-`` when it is absent or null."""
    return "-" if value is None else escape_text(str(value))


def count(value: Any) -> int:
    return value if isinstance(value, int) else 0


def mqtt_line(value: Any) -> list[tuple[str, str]]:
    """``relayctl status``'s mqtt line: its state and how many messages are spooled."""
    if not isinstance(value, dict):
        return []
    return [("mqtt", f"{text(value.get('state'))}, {count(value.get('spooled'))} spooled")]


def seconds(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


# The columns relayctl(1) names under ``ports list``; MAXCONN is max_connections.
PORT_COLUMNS = (
    "PORT",
    "NAME",
    "HOST",
    "FRAMING",
    "MAXCONN",
    "STATE",
    "SOURCE",
    "CONNS",
    "MESSAGES",
    "BYTES",
)


def ports_table(ports: list[dict[str, Any]]) -> str:
    rows = [
        (
            text(p.get("port")),
            text(p.get("name")),
            text(p.get("connect") or p.get("serial") or p.get("host")),  # where its data comes from
            text(p.get("framing")),
            text(p.get("max_connections")),
            text(p.get("state")),
            text(p.get("source")),
            str(count(p.get("connections"))),
            str(count(p.get("messages_received"))),
            human_bytes(count(p.get("bytes_received"))),
        )
        for p in ports
    ]
    return table(PORT_COLUMNS, rows, right={0, 4, 7, 8, 9})


# The columns relayctl(1) names under ``tokens list``.
TOKEN_COLUMNS = ("NAME", "READ", "WRITE", "CREATED", "EXPIRES", "LAST USED")


def permission(value: Any) -> str:
    """A token's ``read`` or ``write`` as relayctl shows it: ``8001,8002``, ``all``, ``-``."""
    try:
        return ports_text(ports_from_json(value))
    except ValueError:  # not what the API promises: show it, escaped
        return text(value)


def tokens_table(tokens: list[dict[str, Any]]) -> str:
    rows = [
        (
            text(t.get("name")),
            permission(t.get("read")),
            permission(t.get("write")),
            text(t.get("created")),
            text(t.get("expires")),
            text(t.get("last_used")),
        )
        for t in tokens
    ]
    return table(TOKEN_COLUMNS, rows, right=set())


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in pairs)


def labelled(port: dict[str, Any]) -> str:
    """``port 8004 (gps-1)``, or ``port 8004`` without a name."""
    name = port.get("name")
    return f"port {text(port.get('port'))}" + (f" ({text(name)})" if name else "")


def draining_note(port: dict[str, Any], drain_timeout: Any) -> str:
    """What ``ports remove`` says before it waits: the port drains, and for how long at most.

    ``drain_timeout`` is ``GET /v1/status``'s field; without it the limit is
    named by its config key instead of a number.
    """
    valid = isinstance(drain_timeout, int | float) and not isinstance(drain_timeout, bool)
    limit = f"{drain_timeout:g} s" if valid and drain_timeout >= 0 else "drain.timeout"
    return f"{labelled(port)} is draining: devices still connected get up to {limit} to close"
