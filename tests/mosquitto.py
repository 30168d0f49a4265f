"""A real Mosquitto broker for the tests, and a real subscriber (paho) that collects.

``Mosquitto`` runs ``mosquitto -c <file>`` on an ephemeral loopback port with a
config file the test writes (anonymous, a password file, or a TLS listener
with tests/certs.py certificates); it can be stopped and started again on the
same port. Without the ``mosquitto`` binary the tests skip, unless
``RELAYD_TEST_REQUIRE_MOSQUITTO=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MS, free_port

INSTALL_SCRIPT = Path(__file__).with_name("install-mosquitto.sh")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


@functools.cache
def find_or_install_mosquitto() -> tuple[str | None, str]:
    """The broker (installing Debian's package when missing, as root), or a reason."""
    found = _which("mosquitto")
    if found:
        return found, ""
    if os.environ.get("RELAYD_TEST_NO_INSTALL"):
        return None, "mosquitto is not installed (RELAYD_TEST_NO_INSTALL is set)"
    try:
        result = subprocess.run(
            [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot install mosquitto: {exc}"
    found = _which("mosquitto")
    if result.returncode != 0 or found is None:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        return None, f"cannot install mosquitto: {lines[-1]}"
    return found, ""


def need_mosquitto() -> str:
    """The broker binary, or skip (fail when RELAYD_TEST_REQUIRE_MOSQUITTO=1)."""
    found, reason = find_or_install_mosquitto()
    if found is None:
        if os.environ.get("RELAYD_TEST_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@dataclass
class Mosquitto:
    directory: Path
    port: int = field(default_factory=free_port)
    users: dict[str, str] = field(default_factory=dict)  # name -> password; empty: anonymous
    tls: tuple[str, str] | None = None  # (cert, key) for an mqtts listener
    client_ca: str | None = None  # with tls: clients must show a certificate this CA signed
    process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr"]
        lines.append("max_queued_messages 0")
        if os.geteuid() == 0:  # else it drops to user mosquitto, who cannot read tmp_path
            lines.append("user root")
        if self.users:
            passwd = self.directory / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            passwd_tool = _which("mosquitto_passwd")
            assert passwd_tool is not None, "mosquitto_passwd is missing"
            subprocess.run([passwd_tool, "-U", str(passwd)], check=True, capture_output=True)
            passwd.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            cert, key = self.tls
            lines += [f"certfile {cert}", f"keyfile {key}"]
            if self.client_ca is not None:
                lines += [f"cafile {self.client_ca}", "require_certificate true"]
        path = self.directory / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def spawn(self) -> subprocess.Popen[bytes]:
        binary = need_mosquitto()
        config = self.write_config()
        self.log = self.directory / "mosquitto.log"
        with self.log.open("ab") as out:
            return subprocess.Popen([binary, "-c", str(config)], stdout=out, stderr=out)

    async def start(self) -> None:
        """Start (again, on the same port) and wait until it accepts connections."""
        self.process = self.spawn()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10_000 * MS):
            while True:
                assert self.process.poll() is None, self.log.read_text()
                with socket.socket() as probe:
                    probe.setblocking(False)
                    try:
                        await loop.sock_connect(probe, ("127.0.0.1", self.port))
                        return
                    except OSError:
                        pass
                await asyncio.sleep(20 * MS)  # polling a port: it has no event of its own

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 10)
            self.process = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"


class Subscriber:
    """A real MQTT client on its own thread (paho's loop_start) that keeps every message."""

    def __init__(self, port: int, topic: str, **auth: Any) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sub-{free_port()}")
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._changed.notify_all()

    async def ready(self) -> None:
        ok = await asyncio.to_thread(self._subscribed.wait, 10_000 * MS)
        assert ok, "the subscriber did not get its subscription"

    async def wait_for(self, n: int, timeout: float = 15_000 * MS) -> list[tuple[str, bytes, bool]]:
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: len(self.messages) >= n, timeout)

        ok = await asyncio.to_thread(wait)
        assert ok, f"{len(self.messages)} of {n} messages arrived"
        return list(self.messages)

    def payloads(self) -> list[bytes]:
        return [payload for _, payload, _ in self.messages]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
