"""A fleet: three relayd gateways publish to one real Mosquitto; one subscriber sees all.

Each gateway is a subprocess with its own state directory, ports, client id and topic
(``relayd/{hostname}-<n>/{port}``). One gateway reaches the broker through a TCP proxy
that the test cuts (connections closed, new ones refused) and restores: what that
gateway read meanwhile arrives afterwards, at least once and in order per port (see
relayd.toml(5), [mqtt]).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import MS, DaemonProcess, NotifySocket, send_device, spawn_daemon
from tests.mosquitto import Mosquitto, Subscriber

pytestmark = pytest.mark.anyio

N_GATEWAYS = 3
LINES = 200  # per port and phase


async def until(sub: Subscriber, done: Callable[[], bool], at_least: int) -> None:
    """Wait for ``at_least`` messages, then for each further one until ``done()``
    (repeats count in ``sub.messages``; every wait is bounded)."""
    while not done():
        await sub.wait_for(max(at_least, len(sub.messages) + 1))


# --- a TCP proxy between one gateway and the broker, that the test can cut ----------


class CuttableProxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def allow(self) -> None:
        """Listen (again, on the same port): connections reach the broker."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and close those open, both ways."""
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_w}
        for src, dst in ((reader, up_w), (up_r, writer)):
            t = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.transport.abort()
            self.writers.discard(dst)


# --- the gateways --------------------------------------------------------------------


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def mqtt_section(broker_port: int, n: int) -> str:
    return (
        "[mqtt]\n"
        f'url = "mqtt://127.0.0.1:{broker_port}"\n'
        f'client_id = "fleet-{n}-{{hostname}}"\n'
        f'topic = "relayd/{{hostname}}-{n}/{{port}}"\n'
        'payload = "raw"\nqos = 1\n'
    )


async def mqtt_state(d: DaemonProcess) -> dict[str, object]:
    async with d.admin() as admin:
        status = (await admin.get("/v1/status")).json()
    mqtt = status["mqtt"]
    assert isinstance(mqtt, dict)
    return mqtt


async def wait_mqtt(
    d: DaemonProcess, done: Callable[[dict[str, object]], bool]
) -> dict[str, object]:
    """Poll ``"mqtt"`` of GET /v1/status (a subprocess has no event to wait on)."""
    async with asyncio.timeout(10_000 * MS):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                state = await mqtt_state(d)
                if done(state):
                    return state
            await asyncio.sleep(0.02)


def spooled(state: dict[str, object]) -> int:
    n = state["spooled"]
    assert isinstance(n, int)
    return n


def connected(state: dict[str, object]) -> bool:
    return state["state"] == "connected"


async def feed(d: DaemonProcess, n: int, lines: range) -> None:
    """Each port of gateway ``n`` gets ``lines`` from one device, in order."""
    await asyncio.gather(
        *(
            send_device(port, b"".join(b"g%d:%d:%d\n" % (n, port, i) for i in lines))
            for port in d.ports
        )
    )


def first_seen(payloads: list[str]) -> list[str]:
    """At least once: drop repeats, keep the order in which each arrived first."""
    return list(dict.fromkeys(payloads))


def expected(n: int, port: int, lines: range) -> list[str]:
    return [f"g{n}:{port}:{i}" for i in lines]


async def test_three_gateways_one_broker_one_cut(tmp_path: Path) -> None:
    host = short_hostname()
    async with contextlib.AsyncExitStack() as stack:
        (tmp_path / "broker").mkdir()
        broker = Mosquitto(tmp_path / "broker")
        await broker.start()
        stack.push_async_callback(broker.stop)
        sub = Subscriber(broker.port, "relayd/+/+")
        stack.callback(sub.close)
        await sub.ready()
        proxy = CuttableProxy(broker.port)
        await proxy.allow()
        stack.push_async_callback(proxy.close)

        async def gateway(n: int) -> DaemonProcess:
            gw_dir = tmp_path / f"gw{n}"
            gw_dir.mkdir()
            notify = NotifySocket(gw_dir / "notify.sock")
            stack.callback(notify.close)
            port = proxy.port if n == 2 else broker.port
            d = await stack.enter_async_context(
                spawn_daemon(gw_dir, notify, nports=2, extra=mqtt_section(port, n))
            )
            await stack.enter_async_context(notify.drained())
            return d

        # Started side by side: each one's start is mostly its imports.
        gateways = await asyncio.gather(*(gateway(n) for n in range(1, N_GATEWAYS + 1)))
        topics = {
            f"relayd/{host}-{n}/{port}": (n, port)
            for n, d in enumerate(gateways, 1)
            for port in d.ports
        }
        cut_gw = gateways[1]
        await wait_mqtt(cut_gw, connected)

        # Phase 1: everyone publishes; the subscriber sees all of it.
        first = range(LINES)
        await asyncio.gather(*(feed(d, n, first) for n, d in enumerate(gateways, 1)))

        def by_topic() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for topic, payload, _ in list(sub.messages):
                out.setdefault(topic, []).append(payload.decode())
            return out

        def seen(topic: str) -> list[str]:
            return first_seen(by_topic().get(topic, []))

        await until(sub, lambda: all(len(seen(t)) >= LINES for t in topics), LINES * len(topics))

        # Phase 2: gateway 2 loses the broker; its devices go on sending.
        await proxy.cut()
        await wait_mqtt(cut_gw, lambda state: not connected(state))
        second = range(LINES, 2 * LINES)
        await asyncio.gather(*(feed(d, n, second) for n, d in enumerate(gateways, 1)))
        # What it read waits for the broker: every line of both its ports.
        state = await wait_mqtt(cut_gw, lambda state: spooled(state) >= 2 * LINES)
        assert not connected(state), state
        # Phase 3: the connection comes back; the spool goes out first, in order.
        await proxy.allow()
        whole = range(2 * LINES)
        await until(
            sub, lambda: all(len(seen(t)) >= len(whole) for t in topics), len(whole) * len(topics)
        )
        assert set(by_topic()) == set(topics), "a topic no gateway should use"
        for topic, (n, port) in topics.items():
            assert seen(topic) == expected(n, port, whole), topic
        assert proxy.accepted >= 2  # gateway 2 did reconnect through the proxy
        await wait_mqtt(cut_gw, lambda state: connected(state) and spooled(state) == 0)
