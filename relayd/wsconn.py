"""The WebSocket connection: uvicorn's ``ws=`` protocol class, owner of ``/ws``.

uvicorn parses the HTTP request and hands every upgrade request to this
``asyncio.Protocol``. The WebSocket protocol itself (handshake validation,
frame parsing, ping/pong, closing handshake, permessage-deflate) is the
``websockets`` library's sans-I/O ``ServerProtocol``. This class connects it to
the transport and owns the ``/ws`` endpoint end to end, without an ASGI task:
it asks ``WsEndpoint`` whether and to what the client subscribes before it
answers 101, and from then on the hub writes the frames it encoded once for
every client straight to this connection's transport.

uvicorn creates it as ``ws_protocol_class(config=, server_state=, app_state=)``;
relayd's endpoint reaches it through ``functools.partial`` (see ``protocol_factory``),
the way uvicorn's own protocols get ``config`` and ``server_state``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from relayd.hub import OP_BINARY, OP_TEXT, encode_frame, is_utf8
from relayd.listeners import format_peer
from relayd.ws import PATH, Closed, Refused, Subscribed, WsEndpoint

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from relayd.auth import Grant
    from relayd.hub import Subscription

logger = logging.getLogger("relayd.ws")
# websockets logs every handshake at INFO; relayd logs subscriptions itself.
protocol_logger = logging.getLogger("relayd.wsconn.protocol")
protocol_logger.setLevel(logging.WARNING)

MAX_INCOMING = 1 << 20  # clients' messages are ignored: do not buffer much of them
CLOSE_TIMEOUT = 2.0  # seconds the peer gets to answer our close frame
HIGH_WATER = 256 * 1024  # transport buffer above which the hub keeps frames queued


def protocol_factory(endpoint: WsEndpoint) -> Callable[..., RelayWebSocketProtocol]:
    """The ``ws=`` class for uvicorn's config, bound to relayd's ``/ws`` endpoint."""
    return functools.partial(RelayWebSocketProtocol, endpoint=endpoint)


class RelayWebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        "close_sent",
        "conn",
        "connections",
        "deflate",
        "disconnected",
        "endpoint",
        "grant",
        "loop",
        "paused",
        "peer",
        "ping_interval",
        "quick",
        "ping_timeout",
        "read_paused",
        "subscription",
        "target",
        "timer",
        "transport",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any] | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        endpoint: WsEndpoint,
    ) -> None:
        self.endpoint = endpoint
        self.loop = _loop or asyncio.get_running_loop()
        self.connections: set[Any] = server_state.connections
        relay = endpoint.relay  # read per connection: a reload applies to new clients
        self.ping_interval = relay.ping_interval
        self.ping_timeout = relay.ping_timeout
        extensions = [ServerPerMessageDeflateFactory()] if relay.per_message_deflate else []
        self.conn = ServerProtocol(
            extensions=extensions, max_size=MAX_INCOMING, logger=protocol_logger
        )
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.peer = "?"
        self.subscription: Subscription | None = None
        self.grant: Grant | None = None
        self.target: int | None = None
        self.close_sent = False
        self.disconnected = False
        self.deflate = False
        self.paused = False
        self.read_paused = False  # a client that sends but does not read (see _handle_frame)
        self.quick = True  # data frames may take the quick path (see _received_quickly)
        self.timer: asyncio.TimerHandle | None = None  # ping, pong deadline or close deadline

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            self.peer = "(admin socket)"
        else:
            self.peer = format_peer(transport.get_extra_info("peername"))

    def data_received(self, data: bytes) -> None:
        if self.quick and self._received_quickly(data):
            return
        self.conn.receive_data(data)
        for event in self.conn.events_received():
            if isinstance(event, Request):
                self._handle_request(event)
            elif isinstance(event, Frame):
                self._handle_frame(event)
        self._write_pending()
        if self.conn.parser_exc is not None and not self.transport.is_closing():
            self.transport.close()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._write_pending()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.disconnected = True
        self._cancel_timer()
        subscription, self.subscription = self.subscription, None
        if subscription is None or self.grant is None:
            return  # never subscribed: refused, or not a /ws request
        self.endpoint.closed(subscription, self.grant)
        dropped = subscription.dropped
        extra = f", {dropped} message(s) dropped" if dropped else ""
        logger.info("websocket client %s %s%s", self.peer, self._how_closed(), extra)

    def pause_writing(self) -> None:
        self.paused = True
        if self.subscription is not None:
            self.subscription.pause()

    def resume_writing(self) -> None:
        self.paused = False
        self._resume_reading()
        if self.subscription is not None:
            self.subscription.resume()

    def _resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.disconnected:
                self.transport.resume_reading()

    def shutdown(self) -> None:
        """Called by uvicorn when the server stops: close with 1001 (going away)."""
        if self.conn.state is State.OPEN:
            self.close(1001, "relayd is stopping")
        elif self.conn.state is State.CONNECTING:
            self.transport.close()

    # Hub sink

    def send_frames(self, frames: list[bytes]) -> None:
        if self.close_sent or self.disconnected:
            return
        if self.deflate:
            for frame in frames:
                opcode, payload = _split_frame(frame)
                if opcode == Opcode.TEXT:
                    self.conn.send_text(payload)
                else:
                    self.conn.send_binary(payload)
            self._write_pending()
        elif len(frames) == 1:
            self.transport.write(frames[0])
        else:
            self.transport.write(b"".join(frames))

    def close(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected:
            return
        self.close_sent = True
        try:
            self.conn.send_close(code, reason)
        except InvalidState:
            pass
        self._write_pending()
        self._cancel_timer()
        self.timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
        self._resume_reading()  # for the client's close frame

    def abort(self) -> None:
        self.transport.abort()

    # The handshake: /ws and nothing else

    def _handle_request(self, request: Request) -> None:
        response = self.conn.accept(request)  # checks the upgrade headers, negotiates deflate
        if response.status_code != 101:
            self._refuse(Refused(response.status_code, "Failed to open a WebSocket connection"))
            return
        raw_path, _, query = request.path.partition("?")
        if unquote(raw_path) != PATH:
            self._refuse(Refused(404, "Not Found"))
            return
        sock = self.transport.get_extra_info("socket")
        decision = self.endpoint.open(
            query,
            [
                (name.lower().encode("latin-1"), value.encode("latin-1", "surrogateescape"))
                for name, value in request.headers.raw_items()
            ],
            scheme="wss" if self.transport.get_extra_info("sslcontext") is not None else "ws",
            admin=sock is not None and sock.family == socket.AF_UNIX,
            peer=self.peer,
            sink=self,
        )
        if isinstance(decision, Refused):
            self._refuse(decision)
            return
        self.conn.send_response(response)
        self.deflate = bool(self.conn.extensions)
        if isinstance(decision, Closed):
            logger.info(
                "websocket client %s refused: %s (code %d)",
                self.peer,
                decision.reason,
                decision.code,
            )
            self.close(decision.code, decision.reason)
            return
        assert isinstance(decision, Subscribed)
        self.subscription = decision.subscription
        self.grant = decision.grant
        self.target = decision.target
        if self.paused:
            self.subscription.pause()
        self._schedule_ping()
        logger.info("websocket client %s subscribed to %s", self.peer, decision.description)

    def _refuse(self, refusal: Refused) -> None:
        response = self.conn.reject(refusal.status, refusal.reason + "\n")
        for name, value in refusal.headers:
            response.headers[name] = value
        self.conn.send_response(response)
        self._write_pending()
        self.transport.close()

    def _handle_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            subscription, grant = self.subscription, self.grant
            if subscription is None or grant is None or self.close_sent:
                return
            if not frame.fin:  # fragmented messages are not taken: refused, counted
                self.quick = False  # websockets follows the fragments (its continuation state)
                refused = self.endpoint.fragmented(json_mode=subscription.json)
                if refused is not None:
                    self.conn.send_text(refused)
                return
            data = bytes(frame.data)
            if opcode is Opcode.TEXT and not is_utf8(data):
                # RFC 6455 §8.1; websockets' Sans-I/O protocol leaves the check to us
                self.close(1007, "invalid UTF-8 in a text message")
                return
            answer = self._message(data, subscription.json, grant)
            if answer is not None:
                self.conn.send_text(answer)
        elif opcode is Opcode.PONG:
            if self.timer is not None and not self.close_sent:
                self._cancel_timer()
                self._schedule_ping()
        # Ping and close frames are answered by the websockets protocol itself.

    def _message(self, data: bytes, json_mode: bool, grant: Grant) -> bytes | None:
        """A client's whole message (a downlink write, relayd(8) DOWNLINK): the answer."""
        if self.paused and not self.read_paused:
            # It sends while it does not read what it is sent: answers must not pile up
            # without bound, so stop reading from it until its socket drains.
            self.read_paused = True
            self.transport.pause_reading()
        return self.endpoint.received(
            data, json_mode=json_mode, target=self.target, grant=grant, peer=self.peer
        )

    def _received_quickly(self, data: bytes) -> bool:
        """Handle ``data`` here if it is only whole, unfragmented data frames.

        What clients send under load (thousands of commands a second, relayd(8)
        DOWNLINK) is such frames, and websockets' parser costs about as much as
        the command itself. Taken only while that parser holds nothing and
        the connection is open without compression; anything else (a control
        frame, a fragment, a frame cut by the read, a frame over 64 KiB) goes
        to websockets, which then sees the stream from a frame boundary.
        """
        conn, subscription, grant = self.conn, self.subscription, self.grant
        if (
            subscription is None
            or grant is None
            or self.close_sent
            or self.deflate
            or conn.state is not State.OPEN
            or conn.parser_exc is not None
            or conn.reader.buffer  # part of a frame, read before
        ):
            return False
        payloads: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if n - i < 6 or data[i] not in _QUICK_FIRST_BYTES or data[i + 1] & 0x80 == 0:
                return False  # not fin + text/binary without rsv, or not masked
            length = data[i + 1] & 0x7F
            key = i + 2
            if length == 126:
                if n - i < 8:
                    return False
                length = int.from_bytes(data[key : key + 2], "big")
                key += 2
            elif length == 127:
                return False
            end = key + 4 + length
            if end > n:
                return False
            payload = data[key + 4 : end]
            mask = data[key : key + 4]
            if mask != _ZERO_MASK:
                payload = apply_mask(payload, mask)
            if data[i] == _TEXT_FIRST_BYTE and not is_utf8(payload):
                return False  # closed with 1007 by _handle_frame
            payloads.append(payload)
            i = end
        answers = []
        for payload in payloads:
            answer = self._message(payload, subscription.json, grant)
            if answer is not None:
                answers.append(encode_frame(answer, OP_TEXT))
        if answers:
            self._write_pending()  # what websockets may hold goes first
            self.transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
        return True

    def _how_closed(self) -> str:
        """Who closed, with the code and reason actually sent or received."""
        rcvd, sent = self.conn.close_rcvd, self.conn.close_sent
        if rcvd is not None and (sent is None or self.conn.close_rcvd_then_sent):
            return f"closed by the client (code {rcvd.code}{_reason(rcvd.reason)})"
        if sent is not None:
            answered = "" if rcvd is not None else ", unanswered"
            return f"closed by relayd (code {sent.code}{_reason(sent.reason)}{answered})"
        return "lost the connection (code 1006)"

    def _write_pending(self) -> None:
        """Write what the protocol has to send: one ``transport.write`` for all of it.

        A client's commands read in one go are answered in one write; over TLS
        each write costs a pass through asyncio's SSL layer.
        """
        chunks = self.conn.data_to_send()
        if not chunks:
            return
        pending: list[bytes] = []
        for data in chunks:
            if data:
                pending.append(data)
                continue
            # websockets asks to end the TCP connection (after what it sent before)
            if pending:
                self.transport.write(b"".join(pending))
                pending = []
            self.transport.close()
        if pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    # Keepalive

    def _schedule_ping(self) -> None:
        if self.ping_interval > 0:
            self.timer = self.loop.call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        self.timer = None
        if self.close_sent or self.transport.is_closing() or self.conn.state is not State.OPEN:
            return
        self.conn.send_ping(os.urandom(4))
        self._write_pending()
        if self.ping_timeout > 0:
            self.timer = self.loop.call_later(self.ping_timeout, self._ping_timed_out)
        else:
            self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self.timer = None
        logger.info("websocket client %s did not answer a ping: closing", self.peer)
        self.close(1011, "keepalive ping timeout")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_QUICK_FIRST_BYTES = frozenset((0x80 | OP_TEXT, 0x80 | OP_BINARY))  # fin, no rsv
_TEXT_FIRST_BYTE = 0x80 | OP_TEXT
_ZERO_MASK = bytes(4)


def _reason(reason: str) -> str:
    """A close reason for a log line: the client chose it, so it is quoted and cut."""
    return f": {reason[:123]!r}" if reason else ""


def _split_frame(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of a frame made by ``relayd.hub.encode_frame``."""
    n = frame[1] & 0x7F
    offset = 2 if n < 126 else 4 if n == 126 else 10
    return frame[0] & 0x0F, frame[offset:]
