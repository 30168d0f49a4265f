"""``relayctl send``: write to the devices of a port (relayctl(1), send).

The admin API's ``POST /v1/ports/{port}/send`` (relayd(8), DOWNLINK). The
message is TEXT, or the bytes of a file or of standard input; it goes as
``data`` when it is UTF-8 text and as ``data_b64`` otherwise (or when that is
shorter), so any bytes reach the devices unchanged. Giving both TEXT and
``--file``, or neither, is a usage error (exit 2); a refusal (downlink off, no
device connected, every buffer full) is relayd's ``detail`` and exit 1.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Annotated, Any, BinaryIO

import typer

from relayd.cli_output import count, fail, print_json
from relayd.cli_params import JsonOption, PortArgument
from relayd.cli_transport import answer_object, call, target_of

# relayd takes no message larger than this (relay.max_message's upper bound);
# reading stops one byte past it, so a huge file or an endless pipe is not slurped.
MAX_MESSAGE = 16 * 1024 * 1024


def _read(stream: BinaryIO) -> bytes:
    data = stream.read(MAX_MESSAGE + 1)
    if len(data) > MAX_MESSAGE:
        fail(f"the message is larger than {MAX_MESSAGE} bytes, more than relayd takes")
    return data


def _file_bytes(path: str) -> bytes:
    """The bytes of ``path``, or of standard input for ``-``; unreadable is a usage error."""
    if path == "-":
        return _read(typer.get_binary_stream("stdin"))
    try:
        with open(path, "rb") as stream:
            return _read(stream)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise typer.BadParameter(f"cannot read {path}: {reason}", param_hint="--file") from None


def message_body(data: bytes, peer: str | None) -> dict[str, Any]:
    """The request body: UTF-8 text as ``data``, any other bytes as ``data_b64``.

    Text full of control characters, which JSON spells as 6 bytes each
    (``\u0000``), goes as ``data_b64`` too when that is shorter: relayd takes a
    ``max_message`` in base64, not six times it.
    """
    encoded = base64.b64encode(data).decode("ascii")
    body: dict[str, Any] = {"data_b64": encoded}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if len(json.dumps(text, ensure_ascii=False).encode()) <= len(encoded) + 2:
            body = {"data": text}
    if peer is not None:
        body["peer"] = peer
    return body


def send(
    ctx: typer.Context,
    port: PortArgument,
    message: Annotated[
        str | None,
        typer.Argument(metavar="TEXT", show_default=False, hidden=True),
    ] = None,
    *,
    peer: Annotated[
        str | None,
        typer.Option(
            metavar="ADDR",
            show_default=False,
            help="Only the device connected from ADDR (HOST:PORT, as relayd shows it).",
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            metavar="PATH|-",
            show_default=False,
            help="Send the bytes of PATH, or of standard input for -, instead of TEXT.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write TEXT to the devices on PORT (1-65535) and say how many took it.

    The port needs downlink = true. With framing = "lines" relayd ends the
    message with a newline unless it has one. Bytes that are not UTF-8 text
    are sent unchanged.
    """
    if (message is None) == (file is None):
        raise typer.BadParameter(
            "give TEXT or --file, not both" if file is not None else "give TEXT or --file",
            param_hint="TEXT / --file",
        )
    # TEXT as the bytes it came as, even if they are not UTF-8 (os.fsencode)
    data = _file_bytes(file) if file is not None else os.fsencode(message or "")
    target = target_of(ctx)
    response = call(target, "POST", f"/v1/ports/{port}/send", body=message_body(data, peer))
    if as_json:
        print_json(response.text)
        return
    result = answer_object(target, response)
    typer.echo(f"sent to {count(result.get('delivered'))} device(s)")
