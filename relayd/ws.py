"""``WS /ws``: what a WebSocket client may subscribe to, decided before the 101.

The connection (``relayd.wsconn``) owns ``/ws`` end to end and asks this
module once per handshake: ``WsEndpoint.open`` reads the query and either
subscribes the connection to the hub (before the handshake completes, so
nothing published after the client sees the connection open is missed),
refuses it with an HTTP status, or accepts it only to close it at once with a
WebSocket close code and reason (relayd(8), WEBSOCKET CLIENTS).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from relayd.auth import AuthFailure, Grant
from relayd.config import RelaySettings
from relayd.downlink import Refusal, parse_command
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
from relayd.parsing import ALL
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
    grant: Grant
    description: str  # for the one log line on open: "ports 8001,8002 (json)"
    target: int | None  # the one ?port= of the request: bare messages go there (downlink)


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
    replay: Replay = Replay()
    batch: float = 0.0  # seconds; ?batch_ms=


MAX_BATCH_MS = 10_000


def parse_query(query: str, known_ports: Container[int]) -> Query | Closed:
    """``?port=P`` (repeatable) and ``?format=bare|json``; unknown values close with 1008.

    History (relayd(8), HISTORY AND RECOVERY): ``?last=N`` and ``?since=P:EPOCH:SEQ``
    (``parse_replay``). ``?batch_ms=N`` (0..10000): write to this client at most
    once every N ms, as the status page asks, instead of in every pass of the hub.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return Closed(CLOSE_POLICY_VIOLATION, "too many query parameters")
    fmt = "bare"
    ports: list[int] = []
    history: list[tuple[str, str]] = []
    batch_ms = 0
    for key, value in pairs:
        if key == "format":
            fmt = value
        elif key == "port":
            if not value.isdigit() or int(value) not in known_ports:
                return Closed(CLOSE_POLICY_VIOLATION, f"unknown port {value[:16]}")
            ports.append(int(value))
        elif key in ("last", "since"):
            history.append((key, value))
        elif key == "batch_ms":
            if not (value.isascii() and value.isdigit() and int(value) <= MAX_BATCH_MS):
                return Closed(CLOSE_POLICY_VIOLATION, f"batch_ms {value[:16]!r}: 0 to 10000")
            batch_ms = int(value)
    if fmt not in ("bare", "json"):
        return Closed(CLOSE_POLICY_VIOLATION, f"unknown format {fmt[:16]!r} (bare or json)")
    replay = parse_replay(history, ports or None, fmt == "json", known_ports)
    if isinstance(replay, Closed):
        return replay
    return Query(ports or None, fmt == "json", replay, batch_ms / 1000)


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
            subscription = runtime.hub.subscribe(sink, ports, parsed.json, parsed.batch)
        except HubFull:
            return Closed(CLOSE_TRY_AGAIN_LATER, "too many clients")
        except HubClosed:
            return Closed(CLOSE_GOING_AWAY, "relayd is stopping")
        # History first, in the same callback as subscribe: no gap, no duplicate.
        runtime.hub.replay(subscription, parsed.replay)
        runtime.access.track(subscription, grant)
        where = "all ports" if ports is None else "ports " + ",".join(map(str, ports))
        if grant.kind not in ("anonymous", "admin"):
            where += f" with token {grant.name}"
        target = parsed.ports[0] if parsed.ports is not None and len(parsed.ports) == 1 else None
        return Subscribed(subscription, grant, where + (" (json)" if parsed.json else ""), target)

    def received(
        self,
        data: bytes,
        *,
        json_mode: bool,
        target: int | None,
        grant: Grant,
        peer: str,
    ) -> bytes | None:
        """A message from a client: a downlink write (relayd(8), DOWNLINK); the answer to send.

        Bare format: written to the devices of the connection's one ``?port=``;
        refusals are counted and otherwise ignored. JSON format: a command,
        answered in order with an ``ack`` or an ``error``.
        """
        downlink = self.runtime.downlink
        who = grant.who(peer)
        if not json_mode:
            if target is None:
                downlink.refuse("ignored", "a bare message needs exactly one ?port=")
            else:
                downlink.send(grant, who, target, data)
            return None
        command = parse_command(data)
        if isinstance(command, tuple):
            problem, ident = command
            downlink.refuse(problem.reason, problem.sentence)
            return _answer({"error": problem.sentence, "id": ident})
        result = downlink.send(
            grant, who, command.port, command.data, peer=command.peer, device=command.device
        )
        if isinstance(result, Refusal):
            return _answer({"error": result.sentence, "id": command.id})
        return _ack(command.id, command.port, result)

    def fragmented(self, *, json_mode: bool) -> bytes | None:
        """A fragmented message from a client: refused and counted; the answer in JSON mode."""
        refused = self.runtime.downlink.refuse("invalid", "fragmented messages are not accepted")
        return _answer({"error": refused.sentence, "id": None}) if json_mode else None

    def closed(self, subscription: Subscription, grant: Grant) -> None:
        self.runtime.access.untrack(subscription, grant)
        self.runtime.hub.unsubscribe(subscription)


def _answer(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode()


def _ack(ident: object, port: int, delivered: int) -> bytes:
    """``_answer({"ack": ident, "port": port, "delivered": delivered})``, byte for byte.

    Thousands per second under load: an integer or absent id skips ``json.dumps``.
    """
    if ident is None:
        text = "null"
    elif type(ident) is int:
        text = str(ident)
    else:
        text = json.dumps(ident)
    return b'{"ack": %s, "port": %d, "delivered": %d}' % (text.encode(), port, delivered)


def _requested_ports(query: str) -> list[int]:
    """The numeric ``?port=`` values, for the permission check (parse_query judges the rest)."""
    ports = []
    for part in query.split("&")[:MAX_QUERY_FIELDS]:
        key, _, value = part.partition("=")
        if key == "port" and value.isascii() and value.isdigit() and len(value) <= 5:
            ports.append(int(value))
    return ports
