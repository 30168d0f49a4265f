"""The running relay: current settings, the hub, the listener registry, the port state.

Everything that changes at runtime (reload, ports added or removed through the
admin API, stop) goes through ``Runtime``, which keeps the registry, the state
file and the service manager's view consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from relayd import __version__, tls
from relayd.access import Access, load_jwt
from relayd.auth import Grant
from relayd.config import MqttSettings, PortSettings, Settings, check_frame_size
from relayd.downlink import Downlink, Refusal
from relayd.errors import (
    BindError,
    ConfigError,
    ListenerExists,
    ListenerNotFound,
    RelaydError,
    Stopping,
)
from relayd.hub import Hub
from relayd.listeners import ListenerRegistry, Origin, PortSource, bind
from relayd.mqtt import (
    MqttUplink,
    Spool,
    files_digest,
    import_paho,
    open_spool,
    read_password,
)
from relayd.parsing import ALL, Ports
from relayd.state import PortState
from relayd.systemd import Notifier
from relayd.tokens import TokenRecord, TokenStore

logger = logging.getLogger(__name__)

STATUS_DEBOUNCE = 0.25  # seconds: coalesce STATUS= updates during connection bursts
LOOPBACK = ("127.0.0.1", "::1", "localhost")

Phase = Literal["starting", "ready", "draining"]
MQTT_GRANT = Grant(name="mqtt", read=ALL, write=ALL, kind="admin")  # downlink_topic writes


class StopBudget:
    """How long each step of a stop may take: exit within ``drain.timeout`` + 3 s.

    Devices get ``drain.timeout`` to close on their own. The 3 seconds after it
    are shared, in order, by: closing the devices still connected
    (``DEVICE_CLOSE``), the WebSocket clients' last frames and close handshake
    (whatever is left but ``HTTP_RESERVE``), uvicorn's HTTP connections
    (the rest); ``EXIT_MARGIN`` is kept for the interpreter's own exit.
    """

    EXTRA = 3.0
    EXIT_MARGIN = 0.3
    DEVICE_CLOSE = 0.5
    HTTP_RESERVE = 0.8

    def __init__(self, drain_timeout: float, *, clock: Callable[[], float] = time.monotonic):
        self.drain_timeout = drain_timeout
        self._clock = clock
        self.deadline = clock() + drain_timeout + self.EXTRA - self.EXIT_MARGIN

    def left(self, reserve: float = 0.0) -> float:
        """Seconds until the deadline, keeping ``reserve`` for the steps after this one."""
        return max(0.0, self.deadline - reserve - self._clock())


@dataclass
class ReloadReport:
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    failed: list[dict[str, object]] = field(default_factory=list)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        load_settings: Callable[[], Settings],
        state: PortState,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self._load_settings = load_settings
        self.state = state
        self.notifier = notifier
        relay = settings.relay
        self.epoch = secrets.token_hex(8)  # new at each start, kept across reloads
        self.hub = Hub(
            queue_size=relay.queue_size,
            slow_client=relay.slow_client,
            max_clients=relay.max_clients,
            epoch=self.epoch,
            history=relay.history,
            history_max_bytes=relay.history_max_bytes,
            on_change=self.status_changed,
        )
        # TLS contexts: [http]'s, and each TLS device port's by port number. A reload
        # builds new ones from the files and swaps them in for new handshakes.
        self.http_tls: ssl.SSLContext | None = None
        self.port_tls: dict[int, ssl.SSLContext] = {}
        self.tls_failures = tls.FailureLog()
        self.http_rejected = {"tls": 0, "timeout": 0}  # [http] connections closed early
        self.registry = ListenerRegistry(
            self.hub,
            max_message=relay.max_message,
            on_change=self.status_changed,
            tls_context=self.port_tls.get,
            handshake_timeout=lambda: self.settings.http.handshake_timeout,
            tls_failures=self.tls_failures,
        )
        self.downlink = Downlink(self.registry, lambda: self.settings.relay.max_message)
        self.tokens = TokenStore(state.path.parent)
        self.access = Access(lambda: self.settings, self.tokens)
        self.lock = asyncio.Lock()  # serializes port changes, reloads and the drain
        self.phase: Phase = "starting"
        self.started_at = time.monotonic()
        self.http_address = f"{settings.http.host}:{settings.http.port}"
        self._prebound: list[tuple[PortSettings, Origin, socket.socket | None]] = []
        self._status_handle: asyncio.TimerHandle | None = None
        self.mqtt: MqttUplink | None = None  # [mqtt]: the broker uplink (relayd.mqtt)
        self._mqtt_files = b""  # what its password and TLS files held when it was made

    # Access control and TLS

    def load_auth(self) -> None:
        """Tokens (a bad file fails closed, logged) and the JWT key (ConfigError when unusable)."""
        self.tokens.load()
        self.access.set_jwt(load_jwt(self.settings))
        if self.settings.auth.mode == "none" and self.settings.http.host not in LOOPBACK:
            logger.warning(
                '[auth] mode is "none" and [http] listens on %s: anyone who reaches it '
                "may subscribe to every port (relayd.toml(5), [auth])",
                self.settings.http.host,
            )

    def add_token(
        self, name: str, read: Ports, write: Ports, expires_in: float | None
    ) -> tuple[TokenRecord, str]:
        return self.tokens.add(name, read, write, expires_in)

    def remove_token(self, name: str) -> TokenRecord:
        """Remove a token and close every connection that used it (1008 "token revoked")."""
        record = self.tokens.remove(name)
        closed = self.access.revoke(record.token_id)
        if closed:
            logger.info("token %s: closed %d connection(s)", name, closed)
        return record

    def load_tls(self) -> None:
        """Read every certificate and key the daemon starts with; ConfigError names the file."""
        ports = [p for p, _ in self.state.apply(self.settings.ports).values()]
        self.http_tls, contexts = self._tls_contexts(self.settings, ports)
        self.port_tls.clear()
        self.port_tls.update(contexts)

    @staticmethod
    def _tls_contexts(
        settings: Settings, ports: Iterable[PortSettings]
    ) -> tuple[ssl.SSLContext | None, dict[int, ssl.SSLContext]]:
        http = settings.http
        http_tls = None
        if http.tls_cert is not None and http.tls_key is not None:
            http_tls = tls.server_context("http", http.tls_cert, http.tls_key, http.tls_client_ca)
        contexts = {}
        for port in ports:
            if not port.tls:
                continue
            cert, key = port.tls_cert or http.tls_cert, port.tls_key or http.tls_key
            if cert is None or key is None:
                raise ConfigError(
                    [f"port {port.port}: tls = true needs tls_cert and tls_key, "
                     "on the port or in [http]"]
                )  # fmt: skip
            contexts[port.port] = tls.server_context(f"port {port.port}", cert, key, port.client_ca)
        return http_tls, contexts

    def http_handshake_failed(self, peer: str, exc: BaseException) -> None:
        self.http_rejected["tls"] += 1
        self.tls_failures.failed("http", peer, tls.failure_reason(exc))

    def http_timed_out(self) -> None:
        self.http_rejected["timeout"] += 1

    # The MQTT uplink

    def load_mqtt(self) -> None:
        """Open the spool and make the uplink when [mqtt] is on; ConfigError: exit 78."""
        self._set_uplink(self._make_uplink(self.settings.mqtt, None))

    def _make_uplink(self, settings: MqttSettings, spool: Spool | None) -> MqttUplink | None:
        if not settings.enabled:
            return None
        import_paho()  # the install hint first: nothing else matters without the library
        password = read_password(settings)
        self._mqtt_files = files_digest(settings)
        if spool is None:
            spool = open_spool(self.state.path.parent / "spool", settings.spool_max_bytes)
        return MqttUplink(
            settings,
            spool,
            password=password,
            on_state=self.status_changed,
            downlink=self._mqtt_downlink,
            downlink_ports=self._downlink_ports,
        )

    def _set_uplink(self, uplink: MqttUplink | None) -> None:
        self.mqtt = uplink
        self.hub.tap = uplink

    def _mqtt_downlink(self, port: int, data: bytes) -> None:
        """A message on a port's ``downlink_topic``: written like any downlink (audited)."""
        result = self.downlink.send(MQTT_GRANT, "mqtt", port, data)
        if isinstance(result, Refusal):
            logger.debug("mqtt downlink to port %d refused: %s", port, result.sentence)

    def _downlink_ports(self) -> list[tuple[int, str | None]]:
        return [
            (source.port, source.settings.name)
            for source in self.registry.listeners()
            if source.settings.downlink and not source.draining
        ]

    async def _reload_mqtt(self, new: Settings) -> None:
        """A changed [mqtt] gets a new client; the spool and what it holds are kept.

        ``password_file`` and the TLS files are read again (relayd.toml(5)): a new
        password, CA or client certificate alone is a change.
        """
        old = self.mqtt
        if new.mqtt == self.settings.mqtt and (
            old is None or files_digest(new.mqtt) == self._mqtt_files
        ):
            return
        spool = await old.detach() if old is not None else None
        try:
            uplink = self._make_uplink(new.mqtt, spool)
        except ConfigError:
            if old is not None:  # keep the running uplink
                old.attach()
            raise
        if uplink is None and spool is not None:
            spool.close()
        self._set_uplink(uplink)
        if uplink is not None and self.phase == "ready":
            uplink.start()
        self.status_changed()

    # Start and stop

    def bind_all(self) -> None:
        """Bind every port the daemon starts with; BindError names the first that fails."""
        try:
            for settings, origin in self.state.apply(self.settings.ports).values():
                sock = (
                    bind(settings) if settings.source_kind == "listen" else None
                )  # dialled, serial
                self._prebound.append((settings, origin, sock))
        except BindError:
            self.close_prebound()
            raise

    def close_prebound(self) -> None:
        for _, _, sock in self._prebound:
            if sock is not None:
                sock.close()
        self._prebound.clear()

    async def start_listeners(self) -> None:
        prebound, self._prebound = self._prebound, []
        for settings, origin, sock in sorted(prebound, key=lambda item: item[0].port):
            await self.registry.add(settings, origin=origin, sock=sock)
            self._warn_open_downlink(settings)

    def _warn_open_downlink(self, settings: PortSettings) -> None:
        """At start, and whenever a port or [auth] change opens a port's downlink to all."""
        if settings.downlink and self.settings.auth.mode == "none":
            logger.warning(
                'port %d: downlink is on and [auth] mode is "none": anyone who reaches '
                "[http] may write to its devices",
                settings.port,
            )

    def set_ready(self) -> None:
        self.phase = "ready"
        self.notifier.ready()
        self.notifier.status(self.status_text())
        if self.mqtt is not None:  # after READY: the broker never delays it
            self.mqtt.start()

    @property
    def draining(self) -> bool:
        return self.phase == "draining"

    async def shutdown(self, budget: StopBudget | None = None) -> None:
        """Drain devices, then flush and close every WebSocket client (relayd(8), STOP).

        Every listener stops accepting at once; the drain then runs under the
        runtime lock, so a port change or reload in flight finishes first, and
        none can start (``Stopping``) until the process exits.
        """
        if self.draining:
            return
        self.phase = "draining"
        if budget is None:
            budget = StopBudget(self.settings.drain.timeout)
        self.notifier.stopping()
        self.notifier.status("stopping: draining connections")
        timeout = budget.drain_timeout
        logger.info("stopping: draining devices for up to %g s", timeout)
        close_grace = StopBudget.DEVICE_CLOSE
        self.registry.stop_all(timeout, close_grace=close_grace)
        async with self.lock:
            await self.registry.drain_all(timeout, close_grace=close_grace)
        await self.hub.close(budget.left(reserve=StopBudget.HTTP_RESERVE))
        if self.mqtt is not None:  # acknowledgements within drain.timeout; the rest stays spooled
            wait = min(timeout, budget.left(reserve=StopBudget.HTTP_RESERVE))
            await self.mqtt.close(wait)
        self.tokens.flush()  # when each token was last used
        logger.info("stopped relaying")

    # Status

    def status_changed(self) -> None:
        if self._status_handle is None:
            loop = asyncio.get_running_loop()
            self._status_handle = loop.call_later(STATUS_DEBOUNCE, self._send_status)

    def _send_status(self) -> None:
        self._status_handle = None
        if not self.draining:
            self.notifier.status(self.status_text())
            if self.mqtt is not None:
                self.mqtt.resubscribe()

    def status_text(self) -> str:
        sources = self.registry.listeners()
        waiting = sum(1 for source in sources if source.state == "connecting")
        ports = f"{len(sources)} ports" + (f" ({waiting} connecting)" if waiting else "")
        text = f"relaying {ports}, {self.hub.clients} clients"
        mqtt = self.mqtt
        if mqtt is not None and mqtt.state != "connected":
            text += f", MQTT broker not connected ({mqtt.spooled} spooled)"
        return text

    def mqtt_status(self) -> dict[str, object]:
        mqtt = self.mqtt
        if mqtt is None:
            return {"state": "off", "spooled": 0}
        return {"state": mqtt.state, "spooled": mqtt.spooled}

    def status(self) -> dict[str, object]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "state": self.phase,
            "drain_timeout": self.settings.drain.timeout,
            "http": self.http_address,
            "ports": len(self.registry),
            "tcp_connections": self.registry.tcp_connections,
            "ws_clients": self.hub.clients,
            "mqtt": self.mqtt_status(),
        }

    # Port changes (admin API)

    async def add_port(self, settings: PortSettings) -> PortSource:
        """Open a runtime port and persist it; no trace is left when anything fails."""
        if self.draining:  # at once: the drain holds the lock until it ends
            raise Stopping
        async with self.lock:
            if self.draining:
                raise Stopping
            if settings.port in self.registry:
                raise ListenerExists(settings.port)
            try:
                check_frame_size(settings, self.settings.relay.max_message)
            except ValueError as exc:
                raise ConfigError([str(exc)]) from None
            _, contexts = self._tls_contexts(self.settings, [settings])
            sock = bind(settings) if settings.source_kind == "listen" else None
            new_state = self.state.with_added(settings)
            try:
                new_state.save()
            except RelaydError:
                if sock is not None:
                    sock.close()
                raise
            self.port_tls.update(contexts)
            try:
                listener = await self.registry.add(settings, origin="runtime", sock=sock)
            except BaseException:  # not serving after all (it closed the socket): undo the save
                try:
                    self.state.save()
                except RelaydError as exc:
                    logger.error("port %d: cannot undo the state change: %s", settings.port, exc)
                raise
            self.state = new_state
        logger.info("port %d added at runtime", settings.port)
        self._warn_open_downlink(settings)
        return listener

    async def remove_port(self, port: int, *, force: bool = False) -> PortSource:
        """Persist the removal, then drain that port alone; returns it with final counters."""
        if self.draining:
            raise Stopping
        async with self.lock:
            if self.draining:
                raise Stopping
            listener = self.registry.get(port)
            if not listener.draining:
                in_config = any(p.port == port for p in self.settings.ports)
                new_state = self.state.with_removed(port, in_config=in_config)
                new_state.save()
                self.state = new_state
            timeout = 0.0 if force else self.settings.drain.timeout
            listener.stop(timeout)
        logger.info("port %d removed at runtime%s", port, " (forced)" if force else "")
        try:
            return await self.registry.remove(port, drain_timeout=timeout)
        finally:
            self._drop_history(port)

    def _drop_history(self, port: int) -> None:
        """A removed port loses its history once drained, unless it is back already."""
        if port not in self.registry:
            self.hub.history.drop(port)

    # Reload

    async def reload(self) -> ReloadReport:
        """Re-read the config and reconcile ports; ConfigError leaves everything running.

        Refused with ``Stopping`` (and no RELOADING=1) once the drain has begun.
        """
        if self.draining:
            logger.warning("reload refused: relayd is stopping")
            raise Stopping
        self.notifier.reloading()
        try:
            async with self.lock:
                if self.draining:
                    logger.warning("reload refused: relayd is stopping")
                    raise Stopping
                try:
                    new = self._load_settings()
                    # [http] keeps its running values until a restart; its files are re-read.
                    effective = new.model_copy(update={"http": self.settings.http})
                    ports = [p for p, _ in self.state.apply(new.ports).values()]
                    http_tls, contexts = self._tls_contexts(effective, ports)
                    jwt = load_jwt(new)
                    await self._reload_mqtt(new)
                except ConfigError as exc:
                    for problem in exc.problems:
                        logger.error("reload rejected: %s", problem)
                    raise
                self.http_tls = http_tls
                self.access.set_jwt(jwt)
                self.port_tls.clear()
                self.port_tls.update(contexts)
                report = await self._reconcile(new)
                was_open = self.settings.auth.mode == "none"
                self._apply_settings(new)
                for listener in self.registry.listeners():
                    if listener.draining:
                        continue
                    if not was_open or listener.port in report.added + report.changed:
                        self._warn_open_downlink(listener.settings)
        finally:
            if not self.draining:
                self.notifier.ready()
                self.status_changed()
        logger.info(
            "reloaded: added %s, removed %s, changed %s, failed %s",
            report.added,
            report.removed,
            report.changed,
            [f["port"] for f in report.failed],
        )
        return report

    async def _reconcile(self, new: Settings) -> ReloadReport:
        report = ReloadReport()
        desired = self.state.apply(new.ports)
        current = {listener.port: listener for listener in self.registry.listeners()}
        # A port still draining after a removal, which the new config wants: let the
        # drain finish, then open it again below (else it would be gone when it ends).
        finishing = [port for port, lst in current.items() if lst.draining and port in desired]
        for port, listener in current.items():
            if listener.draining:
                continue
            if port not in desired:
                report.removed.append(port)
            elif listener.settings != desired[port][0]:
                report.changed.append(port)
            else:
                listener.origin = desired[port][1]

        async def remove(port: int) -> None:
            # A port whose runtime removal is finishing may be gone by the time this
            # runs: that removal deleted it, which is all this wanted.
            with contextlib.suppress(ListenerNotFound):
                await self.registry.remove(port, drain_timeout=new.drain.timeout)

        await asyncio.gather(
            *(remove(port) for port in report.removed + report.changed + finishing)
        )
        for port in report.removed:  # a changed port keeps its history (relayd.toml(5))
            self._drop_history(port)
        for port, (settings, origin) in sorted(desired.items()):
            if port in self.registry or self.draining:
                continue
            try:
                await self.registry.add(settings, origin=origin)
            except BindError as exc:
                logger.error("reload: cannot listen on port %d: %s", port, exc.reason)
                report.failed.append({"port": port, "detail": str(exc)})
                if port in report.changed:
                    report.changed.remove(port)
            else:
                if port not in report.changed:
                    report.added.append(port)
        return report

    def _apply_settings(self, new: Settings) -> None:
        old = self.settings
        if new.http != old.http:
            logger.warning("reload: [http] changed; it applies after a restart")
        if new.admin != old.admin:
            logger.warning("reload: [admin] changed; it applies after a restart")
        relay = new.relay
        self.hub.configure(
            queue_size=relay.queue_size,
            slow_client=relay.slow_client,
            max_clients=relay.max_clients,
            history=relay.history,
            history_max_bytes=relay.history_max_bytes,
        )
        self.registry.configure(max_message=relay.max_message)
        # [http] and [admin] keep their running values until a restart.
        self.settings = new.model_copy(update={"http": old.http, "admin": old.admin})
