"""The MQTT uplink: every relayed message to a broker, through a disk spool (relayd(8), MQTT).

The hub hands each published batch to ``MqttUplink.publish`` (the tap); the
rendered topic and the payloads go to the spool, a write-ahead log in
``<state-dir>/spool/``. Everything the broker gets is read back from the
spool, in order, a bounded window of messages in flight; a message is
acknowledged in the spool when the broker acknowledged it (QoS 1) or when it
was written to the broker's socket (QoS 0). After a reconnect or a restart the
spool is read again from its oldest unacknowledged message: at least once.

Library: paho-mqtt (Debian ``python3-paho-mqtt``) makes the connection: its
``connect()`` (DNS, TCP, the TLS handshake, sending CONNECT) runs in a
short-lived daemon thread (a thread that is not the loop's default executor is
never waited for at exit, so a broker that hangs cannot delay a stop), and its
socket callbacks on relayd's loop read the CONNACK. Then relayd speaks the
session itself on that socket (relayd.mqttwire): a loop iteration's PUBLISH
packets in one write, a read's PUBACKs in one pass, instead of paho's Python
objects, lock and ``recv`` calls per message.

The tap is a list append: the spool and the broker get a batch after the hub's
WebSocket writes of that loop iteration, in slices (``CHUNK``), so the uplink
adds as little as it can to the relay's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from relayd.config import MqttSettings
from relayd.mqttsetup import (
    INSTALL_HINT,
    Spool,
    Topics,
    close_sockets,
    failure_reason,
    files_digest,
    import_paho,
    open_spool,
    read_password,
    short_hostname,
    tls_context,
)
from relayd.mqttwire import Session

__all__ = [
    "INSTALL_HINT",
    "MqttUplink",
    "Spool",
    "Topics",
    "files_digest",
    "import_paho",
    "open_spool",
    "read_password",
    "short_hostname",
]

logger = logging.getLogger(__name__)

# Messages in flight to the broker: QoS 1, sent and not acknowledged (a PUBACK
# costs the same whatever the window); QoS 0, written and not all in the kernel.
WINDOW_QOS1 = 256
WINDOW_QOS0 = 1024
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and the broker's CONNACK
KEEPALIVE = 30
SYNC_INTERVAL = 1.0  # seconds between fdatasync of the spool (relayd(8), MQTT: power cut)
# Messages moved from the tap into the spool per loop iteration: a burst is spooled
# in slices, so one iteration never runs long while devices and clients wait.
CHUNK = 2048
# Messages the tap may hold beyond that: a pump takes more when the devices send
# faster than CHUNK per iteration, so this backlog stays bounded.
BACKLOG = 8 * CHUNK

State = Literal["off", "connecting", "connected"]


class MqttUplink:
    """One broker connection, reconnecting with backoff, fed from the spool."""

    def __init__(
        self,
        settings: MqttSettings,
        spool: Spool,
        *,
        password: str | None,
        on_state: Callable[[], None],
        downlink: Callable[[int, bytes], None],
        downlink_ports: Callable[[], list[tuple[int, str | None]]],
    ) -> None:
        self._paho = import_paho()
        self.settings = settings
        self.spool = spool
        self.json = settings.payload == "json"
        self.window = WINDOW_QOS1 if settings.qos == 1 else WINDOW_QOS0
        self.password = password  # read from password_file at start or reload
        self._tls = tls_context(settings) if settings.address[2] else None
        self._on_state = on_state
        self._downlink = downlink
        self._downlink_ports = downlink_ports
        hostname = short_hostname()
        self.topics = Topics(settings.topic, hostname)
        self.downlink_topics = (
            Topics(settings.downlink_topic, hostname) if settings.downlink_topic else None
        )
        self.client_id = settings.client_id.format(hostname=hostname)
        self.state: State = "connecting"
        self.published = 0
        self.last_error: str | None = None
        self._loop = asyncio.get_running_loop()
        self._client: Any = None
        self._session: Session | None = None  # after CONNACK: relayd speaks MQTT itself
        self._subscribed: dict[str, int] = {}  # downlink topic -> port
        self._pump_handle: asyncio.Handle | None = None
        self._kick_handle: asyncio.Handle | None = None
        self._incoming: deque[tuple[str, list[bytes]]] = deque()  # taken, not yet spooled
        self._pending = 0  # messages in _incoming
        self._task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[str | None] | None = None
        self._lost = asyncio.Event()
        self._idle = asyncio.Event()
        self._closing = False
        self.connect_timeout = CONNECT_TIMEOUT

    # The tap (the hub calls it for every published batch)

    def publish(self, port: int, name: str | None, payloads: list[bytes]) -> None:
        """Take a batch: a list append; the spool and the broker get it after the fan-out."""
        self._incoming.append((self.topics.render(port, name), payloads))
        self._pending += len(payloads)
        if self._kick_handle is None:
            self._kick_handle = self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """Schedule the pump behind the hub's flush of this loop iteration.

        The hub calls the tap before it schedules its own flush, so a pump
        scheduled from the tap would run first: the WebSocket writes would wait
        for the spool's write and the broker's. One more hop puts it after them.
        """
        self._kick_handle = None
        if self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _take(self, limit: int) -> None:
        """Append the first ``limit`` taken messages to the spool (a batch may be cut)."""
        incoming, append = self._incoming, self.spool.append
        taken = 0
        while incoming and taken < limit:
            topic, payloads = incoming.popleft()
            if len(payloads) > limit - taken:
                incoming.appendleft((topic, payloads[limit - taken :]))
                payloads = payloads[: limit - taken]
            for payload in payloads:
                append(topic, payload)
            taken += len(payloads)
        self._pending -= taken

    @property
    def spooled(self) -> int:
        return self.spool.messages + self._pending

    @property
    def in_flight(self) -> int:
        """Published and not yet acknowledged (QoS 0: not all written)."""
        return self._session.in_flight if self._session is not None else 0

    # Life

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
            self._sync_task = asyncio.create_task(self._sync_every())

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the broker to take what is spooled, then disconnect."""
        for handle in (self._pump_handle, self._kick_handle):
            if handle is not None:
                handle.cancel()
        self._kick_handle = None
        self._take(self._pending)
        self._pump()
        if self.state == "connected" and self.spool.messages:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
        self._closing = True
        await self._stop_tasks()
        self._drop_client()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        self.spool.flush()
        with contextlib.suppress(OSError):
            await self.spool.sync()
        self.spool.close()
        if self.spool.messages:
            logger.info(
                "mqtt: %d message(s) stay in the spool for the next start", self.spool.messages
            )

    async def detach(self) -> Spool:
        """Stop this client (a reload replaces it); the spool goes on, to the next one."""
        self._closing = True
        await self._stop_tasks()
        self._drop_client()
        if self._kick_handle is not None:
            self._kick_handle.cancel()
            self._kick_handle = None
        self._take(self._pending)
        self.spool.flush()
        return self.spool

    def attach(self) -> None:
        """Run again after ``detach`` (a reload that was rejected)."""
        self._closing = False
        self._task = self._sync_task = None
        self.start()

    async def _stop_tasks(self) -> None:
        for task in (self._task, self._sync_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _sync_every(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            await self.spool.sync()

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._closing:
            started = time.monotonic()
            try:
                await self._connect()
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                self._failed(failure_reason(exc))
            else:
                if self.state == "connected":
                    delay = BACKOFF_FIRST
                await self._lost.wait()
            self._drop_client()
            self._set_state("connecting")
            if time.monotonic() - started > BACKOFF_MAX:
                delay = BACKOFF_FIRST
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)
            delay = min(delay * 2, BACKOFF_MAX)

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:  # one line per kind of failure, not per attempt
            host, port, _ = self.settings.address
            logger.warning("mqtt: broker %s:%d: %s; retrying with backoff", host, port, reason)
        self.last_error = reason

    async def _connect(self) -> None:
        paho = self._paho
        host, port, _ = self.settings.address
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.max_queued_messages_set(0)
        if self.settings.username is not None:
            client.username_pw_set(self.settings.username, self.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.connect_timeout = self.connect_timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._lost.clear()
        self._connack = connack = self._loop.create_future()
        done: asyncio.Future[BaseException | None] = self._loop.create_future()

        def connect() -> None:  # in a daemon thread: DNS, TCP, TLS, CONNECT sent
            try:
                client.connect(host, port, keepalive=KEEPALIVE)
                result: BaseException | None = None
            except BaseException as exc:  # handed to the loop below
                close_sockets(exc)
                result = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: relayd exited
                self._loop.call_soon_threadsafe(_settle, done, result)

        threading.Thread(target=connect, name="relayd-mqtt-connect", daemon=True).start()
        async with asyncio.timeout(self.connect_timeout):
            error = await done
            if error is not None:
                raise error
            if client is not self._client:
                raise ConnectionError("closed")
            sock = client.socket()
            # Each write is one whole batch (relayd.mqttwire): no Nagle delay after it.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.on_socket_register_write = lambda c, u, s: self._loop.add_writer(s, self._write)
            client.on_socket_unregister_write = lambda c, u, s: self._loop.remove_writer(s)
            client.on_socket_close = lambda c, u, s: self._forget(s)
            self._loop.add_reader(sock, self._read)
            if client.want_write():
                self._loop.add_writer(sock, self._write)
            self._misc_handle = self._loop.call_later(1.0, self._misc)
            refused = await connack
        if refused is not None:
            self._failed(refused)
            return
        self._take_over(client)
        if self.last_error is not None:
            logger.info("mqtt: connected to %s:%d", host, port)
        else:
            logger.info("mqtt: connected to %s:%d as %s", host, port, self.client_id)
        self.last_error = None

    def _take_over(self, client: Any) -> None:
        """CONNACK came: paho is done, relayd speaks the session on its socket."""
        self._release(client)
        sock = client.socket()
        if client is not self._client or sock is None or sock.fileno() < 0:
            self._lost.set()
            return
        self._session = Session(
            sock,
            qos=self.settings.qos,
            retain=self.settings.retain,
            keepalive=KEEPALIVE,
            on_acked=self._acked,
            on_message=self._on_message,
            on_lost=self._session_lost,
        )
        self.resubscribe()
        self._pump()

    def _release(self, client: Any) -> None:
        """paho stops using its socket: out of the selector, no callbacks, no timer."""
        handle = getattr(self, "_misc_handle", None)
        if handle is not None:
            handle.cancel()
        sock = client.socket()
        if sock is not None:
            self._forget(sock)
        client.on_connect = None
        client.on_disconnect = None
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        session, self._session = self._session, None
        if session is not None:
            session.close()  # DISCONNECT, and paho's socket closed
        if client is None:
            return
        self._release(client)
        if session is None:
            with contextlib.suppress(Exception):
                client.disconnect()
        with contextlib.suppress(Exception):
            if client.socket() is not None:
                client.socket().close()
        self._subscribed.clear()
        self.spool.rewind()

    def _forget(self, sock: Any) -> None:
        """paho closes ``sock``: out of the selector first (its number may come back)."""
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    # paho's socket until CONNACK

    def _read(self) -> None:
        if self._client is not None and self._session is None:
            self._client.loop_read()

    def _write(self) -> None:
        if self._client is not None and self._session is None:
            self._client.loop_write()

    def _misc(self) -> None:
        client = self._client
        if client is not None:
            client.loop_misc()
            self._misc_handle = self._loop.call_later(1.0, self._misc)

    # paho callbacks (on this loop)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        if reason.is_failure:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(f"connection refused: {reason}")
            self._lost.set()
            return
        self._set_state("connected")
        self._release(client)  # nothing more for paho to read: relayd takes over (_take_over)
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(None)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if client is not self._client:
            return
        if self.state == "connected":
            logger.warning("mqtt: lost the broker connection (%s); reconnecting", reason)
        self._lost.set()

    # the session's callbacks

    def _session_lost(self, reason: str) -> None:
        if self.state == "connected":
            logger.warning("mqtt: lost the broker connection (%s); reconnecting", reason)
        self._lost.set()

    def _acked(self, record_ids: list[int]) -> None:
        """The broker has these (QoS 1: PUBACK; QoS 0: written to its socket)."""
        ack = self.spool.ack
        for record_id in record_ids:
            ack(record_id)
        self.published += len(record_ids)
        session = self._session
        in_flight = session.in_flight if session is not None else 0
        if not in_flight and not self.spool.messages and not self._pending:
            self._idle.set()
        if in_flight < self.window // 2 and self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _on_message(self, topic: str, payload: bytes) -> None:
        port = self._subscribed.get(topic)
        if port is not None and payload:
            self._downlink(port, payload)

    # Publishing from the spool

    def _pump(self) -> None:
        self._pump_handle = None
        spool = self.spool
        if self._incoming:
            self._take(max(CHUNK, self._pending - BACKLOG))
            if self._incoming:  # the rest in the next iteration
                self._pump_handle = self._loop.call_soon(self._pump)
        spool.flush()
        session = self._session
        if session is None or session.closed:
            return
        room = self.window - session.in_flight
        if room > 0:
            session.publish(spool.read(room))  # QoS 0: may be acked at once (_acked)
        if not session.in_flight and not spool.messages and not self._pending:
            self._idle.set()

    def resubscribe(self) -> None:
        """Subscribe to the downlink topic of each port with downlink = true."""
        session = self._session
        if self.downlink_topics is None or session is None or session.closed:
            return
        wanted = {
            self.downlink_topics.render(port, name): port for port, name in self._downlink_ports()
        }
        gone = [topic for topic in self._subscribed if topic not in wanted]
        if gone:
            session.unsubscribe(gone)
        new = [topic for topic in wanted if topic not in self._subscribed]
        if new:
            session.subscribe(new, 1)
        self._subscribed = wanted

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self._on_state()


def _settle(future: asyncio.Future[BaseException | None], result: BaseException | None) -> None:
    if not future.done():
        future.set_result(result)
