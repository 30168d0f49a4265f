"""``RelayServer``: uvicorn's server with relayd's readiness, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import uvicorn

from relayd.errors import ConfigError
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._tasks: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
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
