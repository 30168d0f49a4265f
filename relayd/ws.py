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
from collections.abc import Container
from dataclasses import dataclass
from urllib.parse import parse_qsl

from relayd.config import RelaySettings
from relayd.history import Replay
from relayd.hub import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    HubClosed,
    HubFull,
    Sink,
    Subscription,
)
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)

PATH = "/ws"
MAX_QUERY_FIELDS = 256  # a query with more parameters is refused, not parsed
MAX_DIGITS = 18  # ?last= and a since sequence number: longer is refused, not parsed
MAX_EPOCH = 64  # characters of a since epoch (relayd's own are 16)


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Complete the handshake: the hub writes to the connection from now on."""

    subscription: Subscription
    description: str  # for the one log line on open: "ports 8001,8002 (json)"


@dataclass(frozen=True, slots=True)
class Refused:
    """Answer the handshake with an HTTP status instead of 101."""

    status: int
    reason: str


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
    replay: Replay = Replay()


def parse_query(query: str, known_ports: Container[int]) -> Query | Closed:
    """``?port=P`` (repeatable) and ``?format=bare|json``; unknown values close with 1008.

    History (relayd(8), HISTORY AND RECOVERY): ``?last=N`` and ``?since=P:EPOCH:SEQ``
    (``parse_replay``).
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return Closed(CLOSE_POLICY_VIOLATION, "too many query parameters")
    fmt = "bare"
    ports: list[int] = []
    history: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == "format":
            fmt = value
        elif key == "port":
            if not value.isdigit() or int(value) not in known_ports:
                return Closed(CLOSE_POLICY_VIOLATION, f"unknown port {value[:16]}")
            ports.append(int(value))
        elif key in ("last", "since"):
            history.append((key, value))
    if fmt not in ("bare", "json"):
        return Closed(CLOSE_POLICY_VIOLATION, f"unknown format {fmt[:16]!r} (bare or json)")
    replay = parse_replay(history, ports or None, fmt == "json", known_ports)
    if isinstance(replay, Closed):
        return replay
    return Query(ports or None, fmt == "json", replay)


def parse_replay(
    pairs: list[tuple[str, str]],
    ports: list[int] | None,
    as_json: bool,
    known_ports: Container[int],
) -> Replay | Closed:
    """``last=N`` (at most once; N above what is kept gives what is kept) and
    ``since=P:EPOCH:SEQ`` (JSON format only, one per subscribed port)."""
    last = 0
    seen_last = False
    since: dict[int, tuple[int, str, int]] = {}
    for key, value in pairs:
        if key == "last":
            if seen_last:
                return Closed(CLOSE_POLICY_VIOLATION, "last given twice")
            seen_last = True
            if not _is_number(value):
                return Closed(CLOSE_POLICY_VIOLATION, f"last {value[:16]!r} is not a count")
            last = int(value)
            continue
        if not as_json:
            return Closed(CLOSE_POLICY_VIOLATION, "since needs format=json")
        port_text, _, rest = value.partition(":")
        epoch, _, seq_text = rest.rpartition(":")
        if (
            not _is_number(port_text)
            or not _is_number(seq_text)
            or not 0 < len(epoch) <= MAX_EPOCH
            or not epoch.isascii()
            or not epoch.isprintable()
        ):
            return Closed(CLOSE_POLICY_VIOLATION, f"since {value[:32]!r} is not PORT:EPOCH:SEQ")
        port = int(port_text)
        if port not in known_ports:
            return Closed(CLOSE_POLICY_VIOLATION, f"since: unknown port {port}")
        if ports is not None and port not in ports:
            return Closed(CLOSE_POLICY_VIOLATION, f"since: port {port} is not subscribed")
        if port in since:
            return Closed(CLOSE_POLICY_VIOLATION, f"since given twice for port {port}")
        since[port] = (port, epoch, int(seq_text))
    return Replay(last, tuple(since.values()))


def _is_number(text: str) -> bool:
    """Digits only, and not so many that they are worth parsing."""
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


class WsEndpoint:
    """The one owner of ``/ws`` decisions; the connection class gets it explicitly."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def relay(self) -> RelaySettings:
        """The current ``[relay]`` section: a reload applies to new connections."""
        return self.runtime.settings.relay

    def open(self, query: str, sink: Sink) -> Decision:
        runtime = self.runtime
        parsed = parse_query(query, runtime.registry)
        if isinstance(parsed, Closed):
            return parsed
        try:
            subscription = runtime.hub.subscribe(sink, parsed.ports, parsed.json)
        except HubFull:
            return Closed(CLOSE_TRY_AGAIN_LATER, "too many clients")
        except HubClosed:
            return Closed(CLOSE_GOING_AWAY, "relayd is stopping")
        # History first, in the same callback as subscribe: no gap, no duplicate.
        runtime.hub.replay(subscription, parsed.replay)
        where = "all ports" if parsed.ports is None else "ports " + ",".join(map(str, parsed.ports))
        return Subscribed(subscription, where + (" (json)" if parsed.json else ""))

    def closed(self, subscription: Subscription) -> None:
        self.runtime.hub.unsubscribe(subscription)
