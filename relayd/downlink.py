"""Downlink: writes from WebSocket clients and operators to devices (relayd(8), DOWNLINK).

A write to port P goes to every device connected to P, or to the one named
by ``peer`` (its address) or ``device`` (its TLS identity). Each device
connection has its own bounded buffer (``downlink_buffer``): a device that
does not read fills only its own, and then writes to it are refused while
the others go on; nothing ever waits for a device. Who may write: the
port has ``downlink = true`` and the grant has ``write`` on it.

Every write is audited on the ``relayd.audit`` logger, one line: who, port,
how many devices, bytes per device; never the content. Refusals are counted
by reason (``relayd_downlink_rejected_total``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from relayd.auth import Grant
    from relayd.listeners import ListenerRegistry

audit = logging.getLogger("relayd.audit")

REASONS: Final = (
    "not_permitted",
    "downlink_off",
    "no_such_port",
    "no_such_peer",
    "no_device",
    "buffer_full",
    "too_large",
    "invalid",
    "stopping",
    "ignored",
)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    sentence: str


@dataclass(slots=True)
class Command:
    """One JSON downlink request from a client."""

    port: int
    data: bytes
    peer: str | None = None
    device: str | None = None
    id: Any = None


@dataclass
class DownlinkStats:
    messages: dict[int, int] = field(default_factory=dict)  # by port
    bytes: dict[int, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


# The usual command, as clients write it: a port, printable ASCII text without
# escapes, an optional integer id. Read without the JSON decoder (the result is the
# same); anything else, valid or not, goes through it (``_parse_json``).
_USUAL = re.compile(
    rb'\{"port": ?([1-9][0-9]{0,4}), ?"data": ?"([\x20\x21\x23-\x5b\x5d-\x7e]*)"'
    rb'(?:, ?"id": ?(-?(?:0|[1-9][0-9]{0,17})))?\}'
)


def parse_command(text: bytes) -> Command | tuple[Refusal, Any]:
    """``{"port", "data"|"data_b64", "peer"?, "device"?, "id"?}``; a refusal keeps the id."""
    usual = _USUAL.fullmatch(text)
    if usual is not None:
        port, data, ident = usual.groups()
        if int(port) <= 65535:
            return Command(int(port), data, None, None, None if ident is None else int(ident))
    return _parse_json(text)


def _parse_json(text: bytes) -> Command | tuple[Refusal, Any]:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return Refusal("invalid", "invalid JSON"), None
    if not isinstance(message, dict):
        return Refusal("invalid", "a command is a JSON object"), None
    ident = message.get("id")

    def bad(sentence: str) -> tuple[Refusal, Any]:
        return Refusal("invalid", sentence), ident

    unknown = set(message) - {"port", "data", "data_b64", "peer", "device", "id"}
    if unknown:
        return bad(f"unknown field {sorted(unknown)[0][:32]!r}")
    port = message.get("port")
    if type(port) is not int or not 1 <= port <= 65535:
        return bad('"port" must be a port number')
    if ("data" in message) == ("data_b64" in message):
        return bad('give exactly one of "data" and "data_b64"')
    if "data" in message:
        if not isinstance(message["data"], str):
            return bad('"data" must be a string')
        data = message["data"].encode("utf-8", "surrogatepass")
    else:
        if not isinstance(message["data_b64"], str):
            return bad('"data_b64" must be a base64 string')
        try:
            data = base64.b64decode(message["data_b64"], validate=True)
        except (binascii.Error, ValueError):
            return bad('"data_b64" is not valid base64')
    peer, device = message.get("peer"), message.get("device")
    if peer is not None and device is not None:
        return bad('give at most one of "peer" and "device"')
    for name, value in (("peer", peer), ("device", device)):
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            return bad(f'"{name}" must be a string')
    return Command(port, data, peer, device, ident)


class Downlink:
    """The one write path to devices; used by /ws clients and the admin API."""

    def __init__(
        self,
        registry: ListenerRegistry,
        max_message: Callable[[], int],
    ) -> None:
        self.registry = registry
        self.max_message = max_message
        self.stats = DownlinkStats()

    def refuse(self, reason: str, sentence: str) -> Refusal:
        self.stats.rejected[reason] += 1
        return Refusal(reason, sentence)

    def send(
        self,
        grant: Grant,
        who: str,
        port: int,
        data: bytes,
        *,
        peer: str | None = None,
        device: str | None = None,
    ) -> int | Refusal:
        """Write ``data`` to port ``port``'s devices: how many took it, or why none did."""
        if port not in self.registry:
            return self.refuse("no_such_port", f"port {port} is not a port of relayd")
        listener = self.registry.get(port)
        settings = listener.settings
        if not grant.can_write(port):
            return self.refuse("not_permitted", f"not permitted to write to port {port}")
        if not settings.downlink:
            return self.refuse("downlink_off", f"downlink is off on port {port}")
        if listener.draining:
            return self.refuse("stopping", f"port {port} is draining")
        if len(data) > self.max_message():
            return self.refuse(
                "too_large", f"the message is larger than max_message ({self.max_message()} bytes)"
            )
        if not data:
            return self.refuse("invalid", "the message is empty")
        if settings.framing == "lines" and not data.endswith(b"\n"):
            data += b"\n"
        named = peer is not None or device is not None
        addressed = delivered = 0
        for conn in listener.connections:  # one pass: thousands of writes a second
            if conn.writable and (
                not named or conn.peer == peer or (device and conn.device == device)
            ):
                addressed += 1
                delivered += conn.write(data)
        if addressed == 0:
            if named:
                named_as = f"peer {peer}" if peer is not None else f"device {device}"
                return self.refuse("no_such_peer", f"no {named_as} is connected to port {port}")
            return self.refuse("no_device", f"no device is connected to port {port}")
        if delivered == 0:
            return self.refuse("buffer_full", "every addressed device's buffer is full")
        stats = self.stats
        stats.messages[port] = stats.messages.get(port, 0) + 1
        stats.bytes[port] = stats.bytes.get(port, 0) + len(data) * delivered
        full = addressed - delivered
        if audit.isEnabledFor(logging.INFO):
            skipped = f" ({full} with a full buffer skipped)" if full else ""
            _audit(
                f"downlink: {who} wrote {len(data)} byte(s) to {delivered} device(s)"
                f" on port {port}{skipped}"
            )
        return delivered


def _audit(line: str) -> None:
    """Log one audit line at info, as ``audit.info(line)`` without its caller lookup.

    Thousands of writes per second are each audited (relayd(8), DOWNLINK);
    relayd's log format names no source line, so ``findCaller`` is skipped,
    and ``line`` is not %-formatted again (a ``%`` in a token's name stays).
    """
    audit.handle(audit.makeRecord(audit.name, logging.INFO, __file__, 0, line, (), None))
