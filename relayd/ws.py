"""``WS /ws``: what a WebSocket client may subscribe to, decided before the 101.

The connection (``relayd.wsconn``) owns ``/ws`` end to end and asks this
module once per handshake: ``WsEndpoint.open`` reads the query and either
subscribes the connection to the hub (before the handshake completes, so
nothing published after the client sees the connection open is missed),
refuses it with an HTTP status, or accepts it only to close it at once with a
WebSocket close code and reason (relayd(8), WEBSOCKET CLIENTS).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from relayd.auth import AuthFailure, Grant
from relayd.config import RelaySettings
from relayd.hub import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    HubClosed,
    HubFull,
    Sink,
    Subscription,
)
from relayd.parsing import ALL
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)

PATH = "/ws"
MAX_QUERY_FIELDS = 256  # a query with more parameters is refused, not parsed


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Complete the handshake: the hub writes to the connection from now on."""

    subscription: Subscription
    grant: Grant
    description: str  # for the one log line on open: "ports 8001,8002 (json)"


@dataclass(frozen=True, slots=True)
class Refused:
    """Answer the handshake with an HTTP status instead of 101."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


REFUSALS = {
    "missing": "a token is required (Authorization: Bearer, or ?access_token=)",
    "invalid": "the token is not valid",
    "expired": "the token has expired",
    "revoked": "the token has been revoked",
    "forbidden_port": "the token may not read a requested port",
    "origin": "this origin is not allowed (http.allowed_origins)",
}


def refusal(failure: AuthFailure) -> Refused:
    headers = (("WWW-Authenticate", "Bearer"),) if failure.status == 401 else ()
    return Refused(failure.status, REFUSALS[failure.reason], headers)


@dataclass(frozen=True, slots=True)
class Closed:
    """Complete the handshake, then close at once with ``code`` and ``reason``."""

    code: int
    reason: str


Decision = Subscribed | Refused | Closed


@dataclass(frozen=True, slots=True)
class Query:
    ports: list[int] | None  # None: every port
    json: bool


def parse_query(query: str, known_ports: Container[int]) -> Query | Closed:
    """``?port=P`` (repeatable) and ``?format=bare|json``; unknown values close with 1008."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return Closed(CLOSE_POLICY_VIOLATION, "too many query parameters")
    fmt = "bare"
    ports: list[int] = []
    for key, value in pairs:
        if key == "format":
            fmt = value
        elif key == "port":
            if not value.isdigit() or int(value) not in known_ports:
                return Closed(CLOSE_POLICY_VIOLATION, f"unknown port {value[:16]}")
            ports.append(int(value))
    if fmt not in ("bare", "json"):
        return Closed(CLOSE_POLICY_VIOLATION, f"unknown format {fmt[:16]!r} (bare or json)")
    return Query(ports or None, fmt == "json")


class WsEndpoint:
    """The one owner of ``/ws`` decisions; the connection class gets it explicitly."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def relay(self) -> RelaySettings:
        """The current ``[relay]`` section: a reload applies to new connections."""
        return self.runtime.settings.relay

    def open(
        self,
        query: str,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        scheme: str,
        admin: bool,
        peer: str,
        sink: Sink,
    ) -> Decision:
        """Decide one handshake: Origin, token and ports first (relayd(8), ACCESS CONTROL)."""
        runtime = self.runtime
        requested = _requested_ports(query)
        grant = runtime.access.check(
            headers=headers, query=query, scheme=scheme, admin=admin, peer=peer,
            requested=requested,
        )  # fmt: skip
        if isinstance(grant, AuthFailure):
            return refusal(grant)
        parsed = parse_query(query, runtime.registry)
        if isinstance(parsed, Closed):
            return parsed
        ports = parsed.ports
        if ports is None and grant.all_readable != ALL:
            ports = sorted(grant.all_readable)  # no ?port=: what the token may read
        try:
            subscription = runtime.hub.subscribe(sink, ports, parsed.json)
        except HubFull:
            return Closed(CLOSE_TRY_AGAIN_LATER, "too many clients")
        except HubClosed:
            return Closed(CLOSE_GOING_AWAY, "relayd is stopping")
        runtime.access.track(subscription, grant)
        where = "all ports" if ports is None else "ports " + ",".join(map(str, ports))
        if grant.kind not in ("anonymous", "admin"):
            where += f" with token {grant.name}"
        return Subscribed(subscription, grant, where + (" (json)" if parsed.json else ""))

    def closed(self, subscription: Subscription, grant: Grant) -> None:
        self.runtime.access.untrack(subscription, grant)
        self.runtime.hub.unsubscribe(subscription)


def _requested_ports(query: str) -> list[int]:
    """The numeric ``?port=`` values, for the permission check (parse_query judges the rest)."""
    ports = []
    for part in query.split("&")[:MAX_QUERY_FIELDS]:
        key, _, value = part.partition("=")
        if key == "port" and value.isascii() and value.isdigit() and len(value) <= 5:
            ports.append(int(value))
    return ports
