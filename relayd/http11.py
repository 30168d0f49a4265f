"""``[http]`` connections: uvicorn's h11 protocol with relayd's handshake deadline.

uvicorn bounds idle keep-alive connections but not a request that arrives
slowly: hundreds of "slowloris" connections sending a byte now and then would
hold file descriptors and keep new clients out. Every ``handshake_timeout``
seconds relayd looks at each HTTP connection and closes it when its request
made no progress since the last look: no request head completed yet, or the
same request body still arriving (relayd.toml(5), ``http.handshake_timeout``).
A connection waiting for its response, or upgraded to a WebSocket, is not
touched. relayd uses the h11 implementation always, so that this behaviour
does not depend on whether httptools is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

WAITING = (h11.IDLE, h11.SEND_BODY)  # the client's side of a request still to come


class RelayHttpProtocol(H11Protocol):
    def __init__(
        self,
        *args: Any,
        handshake_timeout: Callable[[], float],
        on_timeout: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._timeout = handshake_timeout
        self._on_timeout = on_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._progress: tuple[Any, Any] = (None, None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm()  # the WebSocket protocol owns the connection from here
        super().handle_websocket_upgrade(event)

    def _marker(self) -> tuple[Any, Any]:
        return self.cycle, self.conn.their_state

    def _arm(self) -> None:
        self._progress = self._marker()
        self._deadline = self.loop.call_later(self._timeout(), self._check)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle, state = self._marker()
        if state in WAITING and cycle is self._progress[0] and state is self._progress[1]:
            self._on_timeout()
            self.transport.close()
            return
        self._arm()
