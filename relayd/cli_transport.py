"""relayctl's transport: how a command reaches relayd, and what a failure means.

Every command is one request to the admin API (relayd(8), ADMIN API), over
the admin Unix socket by default or over ``--url`` with a bearer token;
``tail`` subscribes to ``/ws`` on the same socket or address. Failures map to
relayctl(1)'s exit codes here: relayd refused (1, with its ``detail``), a bad
``--url`` (2, a usage error), relayd cannot be reached (69, with a hint).

A request on the admin socket goes through ``http.client`` (``UnixHTTPConnection``):
the plain commands never import httpx, whose import alone takes longer than the
request. httpx serves ``--url`` (TCP, TLS) and websockets ``tail``; both are
imported where they are used, not at import time; so is typer (``relayctl
status`` runs without it, see ``relayd.ctl``).

The network below httpx is replaceable: pass ``obj=httpx.MockTransport(...)``
to ``typer.testing.CliRunner.invoke`` and every request goes to it.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn
from urllib.parse import urlencode

from relayd import __version__
from relayd.cli_output import EXIT_REFUSED, EXIT_UNAVAILABLE, fail

if TYPE_CHECKING:
    import httpx
    import typer
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

DEFAULT_SOCKET = "/run/relayd/admin.sock"

# Most answers are immediate; removing a port and reloading wait for drains,
# whose length is the daemon's drain.timeout, so they wait as long as it takes.
CONNECT_TIMEOUT = 5.0
QUICK_TIMEOUT = 30.0

USER_AGENT = f"relayctl/{__version__}"


def _timeout(patient: bool) -> httpx.Timeout:
    import httpx

    return httpx.Timeout(None if patient else QUICK_TIMEOUT, connect=CONNECT_TIMEOUT)


class Target(NamedTuple):
    """Where relayd is (the global options) and how to reach it.

    (NamedTuples, not dataclasses: ``relayctl status`` does not import those.)
    """

    socket: str = DEFAULT_SOCKET
    url: str | None = None
    token: str | None = None
    transport: httpx.BaseTransport | None = None

    @property
    def address(self) -> str:
        return self.url if self.url is not None else self.socket

    def client(self) -> httpx.Client:
        import httpx

        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.url is None:
            transport = self.transport or httpx.HTTPTransport(uds=self.socket)
            return httpx.Client(
                base_url="http://relayd",
                transport=transport,
                headers=headers,
                timeout=_timeout(False),
            )
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.Client(
            base_url=self.url, transport=self.transport, headers=headers, timeout=_timeout(False)
        )


def target_of(ctx: typer.Context) -> Target:
    """The target the root callback put in the context."""
    target = ctx.find_object(Target)
    if target is None:  # pragma: no cover - the root callback always sets it
        raise RuntimeError("relayctl: no target in the context")
    return target


def make_target(socket: str, url: str | None, token: str | None, obj: object) -> Target:
    """The target the global options name; a bad ``--url`` is a usage error (exit 2).

    ``obj`` is the click context object: an ``httpx.BaseTransport`` there (from
    tests) carries every request.
    """
    transport = None
    if obj is not None:
        import httpx

        transport = obj if isinstance(obj, httpx.BaseTransport) else None
    if url is not None:
        import httpx
        import typer

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
    return Target(socket=socket, url=url, token=token or None, transport=transport)


# --- failures ----------------------------------------------------------------------


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
    """Exit 69 with the reason and a hint: not running, or not in the relayd group."""
    httpx = sys.modules.get("httpx")  # not imported: exc is none of its exceptions
    timeouts = (TimeoutError,) if httpx is None else (TimeoutError, httpx.TimeoutException)
    os_error = _os_error(exc)
    if isinstance(exc, timeouts):
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


# --- the admin API -----------------------------------------------------------------


class Reply(NamedTuple):
    """An admin API answer, whichever client carried it."""

    status_code: int
    reason_phrase: str
    content: bytes

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over the admin Unix socket."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("relayd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.path)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _call_socket(
    target: Target,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    params: dict[str, str] | None,
    patient: bool,
) -> Reply:
    if params:
        path += ("&" if "?" in path else "?") + urlencode(params)
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    payload = None
    if body is not None:
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    connection = UnixHTTPConnection(target.socket, None if patient else QUICK_TIMEOUT)
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, response.reason, response.read())
    except (OSError, http.client.HTTPException) as exc:
        unreachable(target, exc)
    finally:
        connection.close()


def _call_httpx(
    target: Target,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    params: dict[str, str] | None,
    patient: bool,
) -> Reply:
    import httpx

    try:
        with target.client() as client:
            response = client.request(
                method, path, json=body, params=params, timeout=_timeout(patient)
            )
    except (httpx.TransportError, OSError) as exc:
        unreachable(target, exc)
    return Reply(response.status_code, response.reason_phrase, response.content)


def call(
    target: Target,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    patient: bool = False,
) -> Reply:
    """One admin API request; exits 69 when relayd cannot be reached, 1 when it refuses.

    ``patient``: no read timeout, for requests that wait for a drain.
    """
    if target.url is None and target.transport is None:
        response = _call_socket(target, method, path, body, params, patient)
    else:
        response = _call_httpx(target, method, path, body, params, patient)
    if response.is_error:
        detail = detail_of(response.status_code, response.reason_phrase, response.content)
        if response.status_code == 404 and detail == "Not Found":  # no such route
            if target.url is not None:
                detail += f" ({target.url} does not serve the admin API; is admin.token_file set?)"
            else:
                route = path.split("?", 1)[0]
                detail += (
                    f" (relayd does not know {method} {route}:"
                    f" is it older than relayctl {__version__}?)"
                )
        fail(detail)
    return response


def answer(target: Target, response: Reply) -> Any:
    try:
        return response.json()
    except ValueError:
        fail(f"unexpected answer from relayd at {target.address}: not JSON")


def answer_object(target: Target, response: Reply) -> dict[str, Any]:
    value = answer(target, response)
    if not isinstance(value, dict):
        fail(f"unexpected answer from relayd at {target.address}: not a JSON object")
    return value


def answer_list(target: Target, response: Reply, what: str) -> list[dict[str, Any]]:
    """A JSON list of objects (``what``: "ports", "tokens", for the error)."""
    value = answer(target, response)
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        fail(f"unexpected answer from relayd at {target.address}: not a list of {what}")
    return value


def answer_ports(target: Target, response: Reply) -> list[dict[str, Any]]:
    return answer_list(target, response, "ports")


# --- tail: the WebSocket -----------------------------------------------------------


def closed_message(target: Target, exc: ConnectionClosed) -> tuple[int, str]:
    """What to say and which exit code to use when relayd ends a subscription."""
    from websockets.frames import CloseCode

    close = exc.rcvd
    if close is None:
        return EXIT_UNAVAILABLE, f"lost the connection to relayd at {target.address}"
    if close.code in (CloseCode.POLICY_VIOLATION, CloseCode.TRY_AGAIN_LATER):
        return EXIT_REFUSED, close.reason or f"relayd refused the subscription (code {close.code})"
    names: dict[int, str] = {
        CloseCode.NORMAL_CLOSURE: "normal closure",
        CloseCode.GOING_AWAY: "going away",
        CloseCode.INTERNAL_ERROR: "internal error",
        CloseCode.SERVICE_RESTART: "service restart",
        CloseCode.TRY_AGAIN_LATER: "try again later",
    }
    name = names.get(close.code, f"code {close.code}")
    why = f"{name}: {close.reason}" if close.reason else name
    return EXIT_UNAVAILABLE, f"relayd closed the connection ({why})"


def tail(target: Target, path: str, emit: Callable[[str | bytes], None]) -> tuple[int, str]:
    """Subscribe to ``path`` (``/ws?…``) and pass every message to ``emit``.

    Returns (exit code, why) when relayd ends the subscription; exits 69 when
    it cannot be reached. An exception from ``emit`` (BrokenPipeError) goes
    through.
    """
    import asyncio

    # Import websockets before the loop runs: the imports below, inside the
    # task, then cost nothing instead of blocking the loop for 0.1 s.
    import websockets.asyncio.client
    import websockets.exceptions
    import websockets.frames  # noqa: F401

    return asyncio.run(_tail(target, path, emit))


async def _tail(target: Target, path: str, emit: Callable[[str | bytes], None]) -> tuple[int, str]:
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

    try:
        async with _subscribe(target, path) as ws:
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosed as exc:
                    return closed_message(target, exc)
                emit(message)
    except InvalidStatus as exc:
        response = exc.response
        return EXIT_REFUSED, detail_of(response.status_code, response.reason_phrase, response.body)
    except BrokenPipeError:  # our stdout, not the connection
        raise
    except (OSError, TimeoutError, WebSocketException) as exc:
        unreachable(target, exc)


def _subscribe(target: Target, path: str) -> connect:
    import logging

    from websockets.asyncio.client import connect, unix_connect

    # websockets logs through this logger; the NullHandler keeps Python's
    # last-resort handler from printing its warnings (and tracebacks) to the user.
    # (Made here: the plain commands never import logging.)
    logger = logging.getLogger(__name__)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())

    if target.url is None:
        return unix_connect(
            target.socket,
            uri=f"ws://relayd{path}",
            compression=None,
            max_size=None,
            close_timeout=2,
            user_agent_header=USER_AGENT,
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
        user_agent_header=USER_AGENT,
        logger=logger,
    )
