"""The WebSocket connection: uvicorn's ``ws=`` protocol class for relayd.

uvicorn parses the HTTP request and hands the upgraded connection to this
``asyncio.Protocol``. The WebSocket protocol itself (handshake, frame parsing,
ping/pong, closing handshake, permessage-deflate) is the ``websockets``
library's sans-I/O ``ServerProtocol``; this class connects it to the transport
and to the ASGI app, as uvicorn's own implementations do, and adds one thing
they lack: the hub writes frames it encoded once for every client straight to
this connection's transport (``scope["extensions"]["relayd.sink"]``), without
an ASGI ``send`` and a task switch per message per client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from relayd.hub import Subscription

logger = logging.getLogger(__name__)
# websockets logs every handshake at INFO; relayd logs subscriptions itself (relayd.ws).
protocol_logger = logging.getLogger("relayd.wsconn.protocol")
protocol_logger.setLevel(logging.WARNING)

MAX_INCOMING = 1 << 20  # clients' messages are ignored: do not buffer much of them
MAX_INBOX = 16  # client messages queued for the app before reading pauses
CLOSE_TIMEOUT = 2.0  # seconds the peer gets to answer our close frame
HIGH_WATER = 256 * 1024  # transport buffer above which the hub keeps frames queued


def _addr(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2 and isinstance(info[1], int):
        return str(info[0]), info[1]
    return None


class RelayWebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        "accepted",
        "app",
        "app_state",
        "close_sent",
        "conn",
        "connections",
        "deflate",
        "disconnected",
        "inbox",
        "loop",
        "on_close",
        "paused",
        "ping_interval",
        "ping_timeout",
        "read_paused",
        "response",
        "scope",
        "subscription",
        "tasks",
        "timer",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:  # pragma: no cover - uvicorn loads it before serving
            config.load()
        self.app = config.loaded_app
        self.app_state = app_state
        self.loop = _loop or asyncio.get_running_loop()
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        # The lifespan state carries the runtime, whose [relay] section a reload may change.
        relay = getattr(getattr(app_state.get("runtime"), "settings", None), "relay", None)
        if relay is not None:
            self.ping_interval = relay.ping_interval
            self.ping_timeout = relay.ping_timeout
            deflate = relay.per_message_deflate
        else:
            self.ping_interval = config.ws_ping_interval or 0.0
            self.ping_timeout = config.ws_ping_timeout or 0.0
            deflate = config.ws_per_message_deflate
        extensions = [ServerPerMessageDeflateFactory()] if deflate else []
        self.conn = ServerProtocol(
            extensions=extensions, max_size=MAX_INCOMING, logger=protocol_logger
        )
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.scope: dict[str, Any] = {}
        self.subscription: Subscription | None = None
        self.on_close: Callable[[int], None] | None = None  # set by detach()
        self.response: Response | None = None
        self.accepted = False
        self.close_sent = False
        self.disconnected = False
        self.deflate = False
        self.paused = False
        self.read_paused = False
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None  # ping, pong deadline or close deadline

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        for event in self.conn.events_received():
            if isinstance(event, Request):
                self._handle_request(event)
            elif isinstance(event, Frame):
                self._handle_frame(event)
        self._write_pending()
        if self.conn.parser_exc is not None and not self.transport.is_closing():
            self._deliver({"type": "websocket.disconnect", "code": self.conn.close_code or 1002})
            self.transport.close()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._write_pending()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.disconnected = True
        self._cancel_timer()
        code = self.conn.close_code if self.conn.close_code is not None else 1006
        self._deliver({"type": "websocket.disconnect", "code": code})
        if self.subscription is not None:
            self.subscription.closed = True
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close(code)

    def pause_writing(self) -> None:
        self.paused = True
        if self.subscription is not None:
            self.subscription.pause()

    def resume_writing(self) -> None:
        self.paused = False
        if self.subscription is not None:
            self.subscription.resume()

    def shutdown(self) -> None:
        """Called by uvicorn when the server stops: close with 1001 (going away)."""
        if self.accepted and not self.close_sent and not self.disconnected:
            self.close(1001, "relayd is stopping")
        elif not self.accepted:
            self.transport.close()

    # Hub sink

    def attach(self, subscription: Subscription) -> None:
        self.subscription = subscription
        if self.paused:
            subscription.pause()

    def detach(self, on_close: Callable[[int], None]) -> None:
        """The handler is done: the connection lives on without its ASGI task.

        An idle client then costs its transport, this object and its
        subscription, not a coroutine stack through every middleware.
        Messages from the client are discarded from now on; ``on_close``
        runs once with the close code when the connection ends.
        """
        self.scope = {}
        self.response = None
        self.inbox.clear()
        if self.disconnected:
            on_close(self.conn.close_code if self.conn.close_code is not None else 1006)
        else:
            self.on_close = on_close

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
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.transport.abort()

    # Protocol events

    def _handle_request(self, request: Request) -> None:
        response = self.conn.accept(request)
        if response.status_code != 101:
            self.conn.send_response(response)
            self._write_pending()
            self.transport.close()
            return
        self.response = response
        raw_path, _, query = request.path.partition("?")
        server = _addr(self.transport.get_extra_info("sockname"))
        client = _addr(self.transport.get_extra_info("peername"))
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": server,
            "client": client,
            "root_path": "",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("ascii", "surrogateescape"),
            "query_string": query.encode("ascii", "surrogateescape"),
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1", "surrogateescape"))
                for k, v in request.headers.raw_items()
            ],
            "subprotocols": [],
            "state": self.app_state.copy(),
            "extensions": {"relayd.sink": self},
        }
        self.inbox.append({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_asgi())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _handle_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if self.close_sent or not frame.fin or self.on_close is not None:
                return  # ignored: fragmented, closing, or nobody reads them (detached)
            if opcode is Opcode.TEXT:
                self._deliver({"type": "websocket.receive", "text": bytes(frame.data).decode()})
            else:
                self._deliver({"type": "websocket.receive", "bytes": bytes(frame.data)})
            if len(self.inbox) >= MAX_INBOX and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
        elif opcode is Opcode.PONG:
            if self.timer is not None and not self.close_sent:
                self._cancel_timer()
                self._schedule_ping()
        elif opcode is Opcode.CLOSE:
            close = self.conn.close_rcvd
            code = close.code if close is not None else 1005
            self._deliver({"type": "websocket.disconnect", "code": code})

    def _write_pending(self) -> None:
        for data in self.conn.data_to_send():
            if data:
                self.transport.write(data)
            else:  # websockets asks to end the TCP connection
                self.transport.close()

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
        logger.info("websocket client %s did not answer a ping: closing", _peer(self.scope))
        self.close(1011, "keepalive ping timeout")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # ASGI

    def _deliver(self, message: dict[str, Any]) -> None:
        if self.inbox and self.inbox[-1]["type"] == "websocket.disconnect":
            return
        self.inbox.append(message)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        message = self.inbox.popleft()
        if self.read_paused and len(self.inbox) < MAX_INBOX // 2 and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()
        if message["type"] == "websocket.disconnect":
            self.inbox.appendleft(message)  # every later receive() sees it too
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if not self.accepted:
            if kind == "websocket.accept":
                self.accepted = True
                if self.disconnected:
                    return
                assert self.response is not None
                self.conn.send_response(self.response)
                self.response = None
                self.deflate = bool(self.conn.extensions)
                self._write_pending()
                self._schedule_ping()
            elif kind == "websocket.close":
                self.accepted = self.close_sent = True
                self.conn.send_response(self.conn.reject(403, "Forbidden\n"))
                self._write_pending()
                self.transport.close()
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} before accept")
        elif kind == "websocket.send":
            if self.close_sent or self.disconnected:
                return
            if message.get("bytes") is not None:
                self.conn.send_binary(message["bytes"])
            else:
                self.conn.send_text(message["text"].encode())
            self._write_pending()
        elif kind == "websocket.close":
            self.close(message.get("code", 1000), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def _run_asgi(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            logger.exception("error in the websocket handler")
            if not self.accepted:
                self.conn.send_response(self.conn.reject(500, "Internal Server Error\n"))
                self._write_pending()
            else:
                self.close(1011, "internal error")
        if not self.accepted:
            self.transport.close()
        elif self.on_close is None and not self.close_sent and not self.disconnected:
            self.close(1000, "")


def _split_frame(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of a frame made by ``relayd.hub.encode_frame``."""
    n = frame[1] & 0x7F
    offset = 2 if n < 126 else 4 if n == 126 else 10
    return frame[0] & 0x0F, frame[offset:]


def _peer(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "(unix socket)"
