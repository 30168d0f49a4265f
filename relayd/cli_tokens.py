"""``relayctl tokens``: list, add and remove access tokens (relayctl(1), TOKENS).

The admin API's ``/v1/tokens`` routes (relayd(8), ACCESS CONTROL). ``tokens
add`` prints only the new token on standard output, so that
``TOKEN=$(relayctl tokens add dashboard --read all)`` captures it; what it
grants goes to standard error. Every argument is checked here before a request
is sent: a bad NAME, port list or duration is a usage error (exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

import typer

from relayd.cli_output import (
    fail,
    note,
    permission,
    print_json,
    text,
    tokens_table,
)
from relayd.cli_params import JsonOption, need_command
from relayd.cli_transport import answer_list, answer_object, call, target_of
from relayd.parsing import (
    ALL,
    check_token_name,
    parse_duration,
    parse_ports,
    ports_to_json,
)

tokens_app = typer.Typer(
    help="List, add and remove access tokens for WebSocket clients.",
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _usage(check: Callable[[str], object], value: str) -> None:
    """Run a parsing.py check; its ValueError becomes a usage error."""
    try:
        check(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_name(value: str) -> str:
    _usage(check_token_name, value)
    return value


def _check_ports(value: str | None) -> str | None:
    if value is not None:
        _usage(parse_ports, value)
    return value


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        _usage(parse_duration, value)
    return value


NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", callback=_check_name, show_default=False, hidden=True)
]  # hidden: the "[required]" line; each docstring says what NAME is


def _ports_option(what: str, default: str) -> Any:
    return typer.Option(
        metavar="PORTS|all",
        callback=_check_ports,
        show_default=False,
        help=f"Ports it may {what}, comma-separated (8001,8002), or all (default {default}).",
    )


@tokens_app.callback(invoke_without_command=True)
def tokens(ctx: typer.Context) -> None:
    """List, add and remove access tokens for WebSocket clients."""
    need_command(ctx)


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, *, as_json: JsonOption = False) -> None:
    """List the tokens: their permissions and times (never the tokens themselves)."""
    target = target_of(ctx)
    response = call(target, "GET", "/v1/tokens")
    if as_json:
        print_json(response.text)
        return
    token_list = answer_list(target, response, "tokens")
    typer.echo(tokens_table(token_list) if token_list else "no tokens")


@tokens_app.command("add")
def tokens_add(
    ctx: typer.Context,
    name: NameArgument,
    *,
    read: Annotated[str, _ports_option("read", "all")] = "all",
    write: Annotated[str | None, _ports_option("write to", "none")] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            callback=_check_duration,
            show_default=False,
            help="Valid for this long: 90s, 15m, 12h, 30d (default: no expiry).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create token NAME (1-64 letters, digits, '.', '_', '-') and print it.

    Only the token goes to standard output, so TOKEN=$(relayctl tokens add
    NAME) captures it. relayd keeps only a hash of it: it is shown this once.
    """
    target = target_of(ctx)
    body: dict[str, Any] = {"name": name, "read": ports_to_json(parse_ports(read))}
    if write is not None:
        body["write"] = ports_to_json(parse_ports(write))
    if expires is not None:
        body["expires_in"] = parse_duration(expires)
    response = call(target, "POST", "/v1/tokens", body=body)
    if as_json:
        print_json(response.text)
        return
    created = answer_object(target, response)
    secret = created.get("token")
    if not _plausible_token(secret):
        fail(f"unexpected answer from relayd at {target.address}: no token in it")
    typer.echo(secret)
    expiry = created.get("expires")
    note(
        f"token {text(created.get('name', name))}: read {permission(created.get('read', ALL))},"
        f" write {permission(created.get('write', []))},"
        f" {'expires ' + text(expiry) if expiry else 'no expiry'};"
        " it is shown only this once"
    )


def _plausible_token(value: object) -> bool:
    """One word of printable ASCII: safe to print, and to capture with $(...)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 1024
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def _path_segment(name: str) -> str:
    """NAME in a URL path; "." and ".." (valid names) escaped, or the URL would drop them."""
    return "%2E" * len(name) if name in (".", "..") else quote(name, safe="")


@tokens_app.command("remove")
def tokens_remove(ctx: typer.Context, name: NameArgument, *, as_json: JsonOption = False) -> None:
    """Revoke token NAME: the clients connected with it are disconnected."""
    target = target_of(ctx)
    response = call(target, "DELETE", f"/v1/tokens/{_path_segment(name)}")
    if as_json:
        print_json(response.text)
        return
    removed = answer_object(target, response)
    typer.echo(f"token {text(removed.get('name', name))} removed")
