"""``RelayServer``: uvicorn's server with relayd's readiness, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

import uvicorn

from relayd.errors import ConfigError
from relayd.listeners import BACKLOG, format_peer
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)

# What asyncio's selector loop reports when accept() fails with EMFILE, ENFILE,
# ENOBUFS or ENOMEM; it stops accepting on that socket and retries a second later.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
ACCEPT_BURST_GAP = 10.0  # seconds without a failed accept() that end a burst

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptErrorHandler:
    """Event loop exception handler: one warning line per burst of failed accepts.

    Out of file descriptors, asyncio reports every failed ``accept()`` through
    the loop's exception handler (on 3.11 up to ``backlog`` times per retry),
    and the default handler logs each as an error with a traceback. The loop
    already backs off and retries every second; this turns the reports into
    one line per listening socket and burst. Everything else goes to the
    handler that was installed before (or the default one).
    """

    def __init__(
        self,
        previous: ExceptionHandler | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.previous = previous
        self._clock = clock
        self._last: dict[str, float] = {}  # listening socket -> last failure

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") != ACCEPT_OUT_OF_RESOURCES or not isinstance(exc, OSError):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        where = _sockname(context.get("socket"))
        now = self._clock()
        last = self._last.get(where)
        if last is not None and now - last < ACCEPT_BURST_GAP:
            self._last[where] = now
            return  # the same burst: logged already
        self._last = {k: t for k, t in self._last.items() if now - t < ACCEPT_BURST_GAP}
        self._last[where] = now
        name = errno.errorcode.get(exc.errno or 0, "?")
        logger.warning(
            "cannot accept connections on %s: %s (%s); retrying every second "
            "(logged again after %g s without this error)",
            where,
            (exc.strerror or str(exc)).lower(),
            name,
            ACCEPT_BURST_GAP,
        )


def _sockname(sock: Any) -> str:
    try:
        name = sock.getsockname()
    except (AttributeError, OSError):
        return "a listening socket"
    return format_peer(name) if isinstance(name, tuple) else str(name)


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._tasks: set[asyncio.Task[None]] = set()
        # A stop signal during startup is held until the main loop runs: uvicorn 0.32
        # returns without its shutdown (no drain, lifespan cancelled) when should_exit
        # is already set after startup. A second signal goes through at once.
        self._starting = True
        self._held_signals: list[tuple[int, FrameType | None]] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._starting and not self._held_signals:
            self._held_signals.append((sig, frame))
            return
        super().handle_exit(sig, frame)

    async def main_loop(self) -> None:
        self._starting = False
        for sig, frame in self._held_signals:
            super().handle_exit(sig, frame)
        await super().main_loop()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
        # uvicorn's asyncio servers listen with, and accept per loop iteration, the
        # small ``backlog`` daemon.py gives them; lengthen the kernel's queue again.
        for sock in sockets or ():
            sock.listen(BACKLOG)
        loop = asyncio.get_running_loop()
        # uvicorn leaves SIGHUP alone; its default action would kill the daemon.
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._spawn(self.runtime.notifier.run_watchdog())
        runtime = self.runtime
        runtime.ready = True
        runtime.notifier.ready()
        runtime.notifier.status(runtime.status_text())
        logger.info("relayd ready: %s", runtime.status_text())

    def request_reload(self) -> None:
        logger.info("SIGHUP: reloading the configuration")
        self._spawn(self._reload())

    async def _reload(self) -> None:
        with contextlib.suppress(ConfigError):  # logged by reload(); everything keeps running
            await self.runtime.reload()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGHUP)
        # Drain before uvicorn's own shutdown, which would close every WebSocket with 1012.
        await self.runtime.shutdown()
        for task in self._tasks:
            task.cancel()
        await super().shutdown(sockets=sockets)
