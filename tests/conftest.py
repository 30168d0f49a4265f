"""Harnesses that run the real daemon on loopback and play systemd's notify socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from relayd import daemon
from relayd.config import Settings

# Every wait in the tests is bounded by k * MS; slow machines raise the scale.
MS = float(os.environ.get("RELAYD_TEST_TIMEOUT_SCALE", "1")) / 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    """A loopback port that was free a moment ago (the config format forbids port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def receive(self) -> str:
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(self.sock, 4096)
        message = data.decode()
        self.messages.append(message)
        return message

    async def wait_for(self, prefix: str, timeout: float = 10_000 * MS) -> str:
        """The next message with a line starting with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if any(line.startswith(prefix) for line in message.splitlines()):
                    return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    yield sock
    sock.close()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_text(
    http_port: int,
    ports: list[int],
    *,
    extra: str = "",
    port_extra: str = "",
    drain: float = 2.0,
    http_extra: str = "",
) -> str:
    text = f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n{http_extra}\n'
    text += f"[drain]\ntimeout = {drain}\n\n{extra}\n"
    for port in ports:
        text += f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\nname = "dev-{port}"\n{port_extra}\n'
    return text


@dataclass
class Daemon:
    """A relayd running in this test's event loop."""

    config: Path
    http_port: int
    ports: list[int]
    admin_socket: Path
    state_dir: Path
    notify: NotifySocket
    task: asyncio.Task[int] | None = None
    runtime: Any = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def admin(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.admin_socket))
        return httpx.AsyncClient(transport=transport, base_url="http://relayd")

    async def stop(self) -> int:
        """Stop it the way SIGTERM does (through the injected shutdown trigger)."""
        assert self.task is not None
        self.stop_event.set()
        async with asyncio.timeout(15_000 * MS):
            return await self.task


@contextlib.asynccontextmanager
async def run_daemon(
    tmp_path: Path,
    notify: NotifySocket,
    *,
    nports: int = 2,
    extra: str = "",
    port_extra: str = "",
    admin_token: str | None = None,
    ports: list[int] | None = None,
    drain: float = 2.0,
    http_extra: str = "",
) -> AsyncIterator[Daemon]:
    """Start relayd in-process on fresh loopback ports; yield once READY=1 arrived.

    ``ports``: use these listener ports (to restart a daemon on the same ones).
    """
    captured: list[Any] = []
    fixed_ports = ports
    for _attempt in range(3):
        http_port = free_port()
        listen = fixed_ports or [free_port() for _ in range(nports)]
        cfg = write_config(
            tmp_path / "relayd.toml",
            config_text(
                http_port,
                listen,
                extra=extra,
                port_extra=port_extra,
                drain=drain,
                http_extra=http_extra,
            ),
        )
        d = Daemon(
            config=cfg,
            http_port=http_port,
            ports=listen,
            admin_socket=tmp_path / "admin.sock",
            state_dir=tmp_path / "state",
            notify=notify,
        )
        settings = Settings.load(cfg, admin_socket=str(d.admin_socket))
        d.task = asyncio.create_task(
            daemon.serve(
                settings,
                load_settings=lambda cfg=cfg, d=d: Settings.load(
                    cfg, admin_socket=str(d.admin_socket)
                ),
                state_dir=d.state_dir,
                admin_token=admin_token,
                shutdown_trigger=d.stop_event.wait,
                on_runtime=captured.append,
            )
        )
        ready = asyncio.create_task(notify.wait_for("READY=1"))
        done, _ = await asyncio.wait(
            {d.task, ready}, timeout=10_000 * MS, return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done:
            d.runtime = captured[-1]
            break
        ready.cancel()
        if d.task in done:
            continue  # a port was taken in the meantime: try fresh ones
        raise AssertionError("relayd did not become ready")
    else:
        raise AssertionError("relayd could not bind fresh ports")
    try:
        yield d
    finally:
        if not d.task.done():
            await d.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5_000 * MS) -> None:
    """Poll a condition that has no event of its own, bounded by ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


@dataclass
class DaemonProcess:
    proc: asyncio.subprocess.Process
    http_port: int
    ports: list[int]
    config: Path
    admin_socket: Path
    notify: NotifySocket
    log: Path

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15_000 * MS) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def relayd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relayd", *args]


@contextlib.asynccontextmanager
async def spawn_daemon(
    tmp_path: Path,
    notify: NotifySocket,
    *,
    nports: int = 2,
    extra: str = "",
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    drain: float = 2.0,
) -> AsyncIterator[DaemonProcess]:
    """Start relayd as a subprocess; yield once READY=1 arrived."""
    for _attempt in range(3):
        http_port = free_port()
        ports = [free_port() for _ in range(nports)]
        cfg = write_config(
            tmp_path / "relayd.toml", config_text(http_port, ports, extra=extra, drain=drain)
        )
        log = tmp_path / "relayd.log"
        admin = tmp_path / "admin.sock"
        full_env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})}
        out = log_file(log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *relayd_command(
                    "--config",
                    str(cfg),
                    "--admin-socket",
                    str(admin),
                    "--state-dir",
                    str(tmp_path / "state"),
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        finally:
            out.close()
        d = DaemonProcess(proc, http_port, ports, cfg, admin, notify, log)
        if not wait_ready:
            break
        ready = asyncio.create_task(notify.wait_for("READY=1", timeout=15_000 * MS))
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and not ready.exception():
            exited.cancel()
            break
        ready.cancel()
        if exited.done() and "cannot listen" in d.output():
            continue  # a port was taken in the meantime: try fresh ones
        exited.cancel()
        proc.kill()
        await proc.wait()
        raise AssertionError(f"relayd did not become ready:\n{d.output()}")
    try:
        yield d
    finally:
        if d.proc.returncode is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await d.proc.wait()
            except TimeoutError:
                d.proc.kill()
                await d.proc.wait()


def log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # handed to the subprocess; the caller closes it


async def send_device(port: int, *chunks: bytes, close: bool = True) -> socket.socket:
    """Connect to a listener, send ``chunks`` as separate writes, optionally close."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    for chunk in chunks:
        await loop.sock_sendall(sock, chunk)
    if close:
        sock.close()
    return sock
