"""The daemon's life in one function: ``serve()`` binds, starts, signals READY, stops.

Everything that happens between exec and exit happens here, in this order
(relayd(8), START and STOP):

1. bind every socket (device ports, ``[http]``, the admin socket): a port that
   cannot be bound is one log line and exit 1;
2. the app's lifespan starts the device listeners on their pre-bound sockets;
   uvicorn then serves HTTP and the admin API;
3. ``READY=1``, the watchdog task and the SIGHUP handler;
4. wait for the shutdown trigger: SIGTERM or SIGINT (uvicorn owns those and
   re-raises them after the stop), or the injected ``shutdown_trigger``;
5. ``Runtime.shutdown``: ``STOPPING=1``, drain every device port at once, then
   flush and close every WebSocket client with 1001;
6. uvicorn's own shutdown (HTTP connections, lifespan); remove the admin socket.

The stop has one budget (``StopBudget``): devices get ``drain.timeout``, and
everything after that shares the 3 seconds relayd(8) promises on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvicorn.config
import uvicorn.server

from relayd.errors import BindError, RelaydError
from relayd.http11 import RelayHttpProtocol
from relayd.listeners import ACCEPT_BATCH, BACKLOG, bind_tcp, bind_unix, format_peer
from relayd.runtime import Runtime, StopBudget
from relayd.tls import TlsAcceptor

logger = logging.getLogger(__name__)

# What asyncio's selector loop reports when accept() fails with EMFILE, ENFILE,
# ENOBUFS or ENOMEM; it stops accepting on that socket and retries a second later.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
ACCEPT_BURST_GAP = 10.0  # seconds without a failed accept() that end a burst

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
ShutdownTrigger = Callable[[], Awaitable[object]]


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


class _Tasks:
    """Background tasks of the running daemon (watchdog, reloads, the trigger)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _bind_all(runtime: Runtime) -> list[socket.socket] | None:
    """The HTTP and admin sockets (device ports are held by the runtime); None: logged."""
    settings = runtime.settings
    try:
        runtime.bind_all()
    except BindError as exc:
        logger.error("cannot listen on port %d (%s): %s", exc.port, exc.host, exc.reason)
        return None
    sockets: list[socket.socket] = []
    try:
        sockets.append(bind_tcp(settings.http.host, settings.http.port))
        sockets.append(bind_unix(settings.admin.socket))
    except BindError as exc:
        runtime.close_prebound()
        for sock in sockets:
            sock.close()
        if exc.port:
            logger.error("cannot listen on HTTP port %d (%s): %s", exc.port, exc.host, exc.reason)
        else:
            logger.error("cannot create admin socket %s: %s", exc.host, exc.reason)
        return None
    return sockets


async def serve(
    runtime: Runtime,
    make_config: Callable[[], uvicorn.config.Config],
    *,
    shutdown_trigger: ShutdownTrigger | None = None,
) -> bool:
    """Run relayd from bind to exit; False when it could not start (logged)."""
    sockets = _bind_all(runtime)
    if sockets is None:
        return False
    config = make_config()
    server = uvicorn.server.Server(config)
    tasks = _Tasks()
    loop = asyncio.get_running_loop()
    accept_errors = AcceptErrorHandler(loop.get_exception_handler())
    loop.set_exception_handler(accept_errors)
    admin_path = runtime.settings.admin.socket
    # uvicorn owns SIGTERM and SIGINT: its handler only sets should_exit, and the
    # signal is raised again once this block is left (exit status 143 for systemd).
    with server.capture_signals():
        try:
            if await _start(server, runtime, sockets, tasks):
                if shutdown_trigger is not None:
                    tasks.spawn(_trigger(shutdown_trigger, server))
                await server.main_loop()
            await _stop(server, runtime, sockets, tasks)
        finally:
            loop.set_exception_handler(accept_errors.previous)
            runtime.close_prebound()
            for sock in sockets:
                sock.close()
            # Inside capture_signals: a re-raised SIGTERM ends the process on leaving it.
            with contextlib.suppress(OSError):
                os.unlink(admin_path)
    return server.started


async def _trigger(shutdown_trigger: ShutdownTrigger, server: uvicorn.server.Server) -> None:
    await shutdown_trigger()
    server.should_exit = True


async def _start(
    server: uvicorn.server.Server, runtime: Runtime, sockets: list[socket.socket], tasks: _Tasks
) -> bool:
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    try:
        # The lifespan starts the device listeners. No sockets for uvicorn itself:
        # relayd serves HTTP on its own pre-bound sockets, just below.
        await server.startup(sockets=[])
    except SystemExit:  # uvicorn >= 0.33 exits when the lifespan failed (logged by it)
        return False
    if not server.started:
        return False
    server.servers.extend(await _serve_http(server, runtime, sockets))
    if server.should_exit:  # a stop signal arrived while starting: no READY
        return False
    loop = asyncio.get_running_loop()
    # uvicorn leaves SIGHUP alone; its default action would kill the daemon.
    loop.add_signal_handler(signal.SIGHUP, lambda: tasks.spawn(_reload(runtime)))
    tasks.spawn(runtime.notifier.run_watchdog())
    tasks.spawn(runtime.access.run_expiry())
    runtime.set_ready()
    settings = runtime.settings
    logger.info(
        "relayd ready: %s; HTTP on %s, admin socket %s",
        runtime.status_text(),
        runtime.http_address,
        settings.admin.socket,
    )
    return True


async def _serve_http(
    server: uvicorn.server.Server, runtime: Runtime, sockets: list[socket.socket]
) -> list[asyncio.Server]:
    """Serve ``[http]`` (with TLS when configured) and the admin socket.

    Each connection gets uvicorn's h11 protocol with relayd's handshake deadline
    (relayd.http11); on a TLS ``[http]`` the TLS handshake comes first, with the
    same deadline, on the context of the last start or reload.
    """
    config = server.config
    http_protocol = functools.partial(
        RelayHttpProtocol,
        config=config,
        server_state=server.server_state,
        app_state=server.lifespan.state,
        handshake_timeout=lambda: runtime.settings.http.handshake_timeout,
        on_timeout=runtime.http_timed_out,
    )
    http_sock, admin_sock = sockets
    http_factory: Callable[[], asyncio.Protocol] = http_protocol
    if runtime.http_tls is not None:

        def tls_context() -> ssl.SSLContext:
            assert runtime.http_tls is not None  # set at start, replaced on reload
            return runtime.http_tls

        def http_factory() -> asyncio.Protocol:
            return TlsAcceptor(
                http_protocol,
                context=tls_context,
                timeout=lambda: runtime.settings.http.handshake_timeout,
                on_failure=runtime.http_handshake_failed,
                tasks=server.server_state.tasks,
            )

    loop = asyncio.get_running_loop()
    servers = []
    for sock, factory in ((http_sock, http_factory), (admin_sock, http_protocol)):
        # asyncio accepts up to ``backlog`` connections per loop iteration and listens
        # with the same number: keep the batch small, then lengthen the kernel's queue
        # again (see Listener.start).
        servers.append(await loop.create_server(factory, sock=sock, backlog=ACCEPT_BATCH))
        sock.listen(BACKLOG)
    return servers


async def _reload(runtime: Runtime) -> None:
    logger.info("SIGHUP: reloading the configuration")
    with contextlib.suppress(RelaydError):  # logged by reload(); everything keeps running
        await runtime.reload()


async def _stop(
    server: uvicorn.server.Server, runtime: Runtime, sockets: list[socket.socket], tasks: _Tasks
) -> None:
    if not server.started:
        return
    budget = StopBudget(runtime.settings.drain.timeout)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    # Drain before uvicorn's own shutdown, which would close every WebSocket with 1012.
    await runtime.shutdown(budget)
    tasks.cancel()
    # uvicorn sleeps 0.1 s, then waits up to this long for its HTTP connections.
    grace = max(0.1, round(budget.left() - 0.1, 3))
    server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
    await server.shutdown(sockets=sockets)
