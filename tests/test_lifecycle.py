"""The lifecycle has one owner: stop, drain and admin changes that race them; log lines.

Regression tests for defects found in v1: admin changes during the drain, OS errors on
an admin add, ping-timeout and close-code log lines, the stop budget, the admin socket
left behind after SIGTERM, the state file's format version.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relayd.runtime import StopBudget
from tests.conftest import (
    MS,
    NotifySocket,
    config_text,
    free_port,
    relayd_command,
    run_daemon,
    send_device,
    spawn_daemon,
    wait_until,
)

pytestmark = pytest.mark.anyio


def state_file(d_state_dir: Path) -> dict[str, object]:
    path = d_state_dir / "ports.json"
    return json.loads(path.read_text()) if path.exists() else {}


# Defect 2: a port added, removed or reloaded during the drain escaped the drain.


async def test_admin_changes_during_the_drain_are_refused(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, drain=3.0) as d, d.admin() as admin:
        device = await send_device(d.ports[0], b"held\n", close=False)  # keeps the drain busy
        try:
            new_port = free_port()
            d.stop_event.set()
            await wait_until(lambda: d.runtime.draining)
            added = await admin.post("/v1/ports", json={"port": new_port, "host": "127.0.0.1"})
            removed = await admin.delete(f"/v1/ports/{d.ports[1]}")
            # the config now asks for one more port: a reload would open it
            d.config.write_text(config_text(d.http_port, [*d.ports, new_port], drain=3.0))
            reloaded = await admin.post("/v1/reload")
            for answer in (added, removed, reloaded):
                assert answer.status_code == 503, answer.text
                assert answer.json() == {"detail": "relayd is stopping; no changes are accepted"}
            with pytest.raises(ConnectionRefusedError):  # never opened
                await send_device(new_port, b"x\n")
        finally:
            device.close()
        assert await d.stop() == 0
    assert state_file(d.state_dir) == {}  # nothing half-done reached ports.json


async def test_a_reload_in_flight_when_the_stop_begins_opens_nothing_after_it(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, drain=2.0) as d, d.admin() as admin:
        new_port = free_port()
        # The reload drains a changed port (a device holds it), then would reopen it and
        # open a new one; the stop begins while that drain runs.
        device = await send_device(d.ports[0], b"held\n", close=False)
        try:
            d.config.write_text(
                config_text(d.http_port, [*d.ports, new_port], port_extra="max_connections = 7")
            )
            reload = asyncio.create_task(admin.post("/v1/reload"))
            await wait_until(lambda: d.runtime.registry.get(d.ports[0]).draining)
            d.stop_event.set()
            answer = await reload
        finally:
            device.close()
        assert answer.status_code == 200
        assert answer.json()["added"] == []  # refused to open anything once stopping
        assert await d.stop() == 0
        assert len(d.runtime.registry) == 0


# Defect 3: an OS error on an admin add was a plain-text 500 and a traceback.


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Use up this process's file descriptors (lower the soft limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_an_admin_add_is_one_json_sentence(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        assert (await admin.get("/v1/status")).status_code == 200  # the connection is open
        port = free_port()
        with caplog.at_level(logging.INFO), no_free_descriptors():
            answer = await admin.post("/v1/ports", json={"port": port, "host": "127.0.0.1"})
        assert answer.status_code == 409
        assert answer.json() == {"detail": f"port {port}: too many open files"}
        assert not any(r.exc_info for r in caplog.records), "no traceback for an OS error"
        assert port not in d.runtime.registry
        assert state_file(d.state_dir) == {}


async def test_out_of_descriptors_at_start_is_one_line_and_exit_1(
    tmp_path: Path, notify: NotifySocket
) -> None:
    ports: set[int] = set()
    while len(ports) < 40:
        ports.add(free_port())
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(free_port(), sorted(ports)))

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    result = await asyncio.to_thread(
        subprocess.run,
        relayd_command("--config", str(cfg), "--admin-socket", str(tmp_path / "a.sock")),
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=few_descriptors,
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONASYNCIODEBUG": ""},
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith("too many open files"), result.stderr
    assert "Traceback" not in result.stderr


# Defects 4 and 7: log lines named "(unix socket)" for every client and code 1006 for
# every close.


async def test_close_log_lines_name_the_peer_and_the_real_code(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    extra = "[relay]\nping_interval = 0.2\nping_timeout = 0.2\n"
    with caplog.at_level(logging.INFO, logger="relayd.ws"):
        async with run_daemon(tmp_path, notify, extra=extra) as d:
            async with connect(d.ws_url) as ws:
                peer = f"127.0.0.1:{ws.local_address[1]}"
            await wait_until(lambda: d.runtime.hub.clients == 0)
            assert f"websocket client {peer} closed by the client (code 1000)" in caplog.text

            async with connect(d.ws_url, max_size=None) as big:
                big_peer = f"127.0.0.1:{big.local_address[1]}"
                await big.send(b"x" * (2 << 20))  # over what relayd reads from a client
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(5_000 * MS):
                        await big.recv()
                assert big.close_code == 1009
            await wait_until(lambda: d.runtime.hub.clients == 0)
            assert f"websocket client {big_peer} closed by relayd (code 1009" in caplog.text

            # A client that never answers a ping (a raw socket that sends the handshake only).
            raw = socket.create_connection(("127.0.0.1", d.http_port))
            try:
                raw.sendall(
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                raw_peer = f"127.0.0.1:{raw.getsockname()[1]}"
                await wait_until(lambda: "did not answer a ping" in caplog.text)
                assert f"websocket client {raw_peer} did not answer a ping" in caplog.text
            finally:
                raw.close()
            await wait_until(lambda: d.runtime.hub.clients == 0)
            assert f"websocket client {raw_peer} closed by relayd (code 1011" in caplog.text

            async with connect(d.ws_url) as last:
                last_peer = f"127.0.0.1:{last.local_address[1]}"
                await d.stop()
                assert last.close_code == 1001
    assert f"websocket client {last_peer} closed by relayd (code 1001" in caplog.text
    assert "(unix socket)" not in caplog.text and "code 1006" not in caplog.text


# Defect 5: stop took up to drain.timeout + 3.6 s; relayd(8) promises + 3 s.


def test_the_stop_budget_is_drain_timeout_plus_three_seconds() -> None:
    now = [100.0]
    budget = StopBudget(2.0, clock=lambda: now[0])
    assert budget.left() == pytest.approx(2.0 + 3.0 - StopBudget.EXIT_MARGIN)
    now[0] += 2.0 + StopBudget.DEVICE_CLOSE  # the drain and the device close used theirs
    clients = budget.left(reserve=StopBudget.HTTP_RESERVE)
    assert clients == pytest.approx(3.0 - StopBudget.EXIT_MARGIN - 0.5 - 0.8)
    now[0] += 10
    assert budget.left() == 0.0


@pytest.mark.xdist_group("heavy")  # a flood or a timed wait: one at a time
async def test_a_stop_with_everything_stuck_exits_within_the_budget(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """A device that never closes, a client that never reads nor answers the close, an
    HTTP request that never completes: exit within drain.timeout + 3 s all the same."""
    drain = 1.0
    async with spawn_daemon(tmp_path, notify, drain=drain) as d:
        device = await send_device(d.ports[0], b"held\n", close=False)
        stuck = socket.create_connection(("127.0.0.1", d.http_port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        half = socket.create_connection(("127.0.0.1", d.http_port))
        half.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        try:
            async with httpx.AsyncClient() as client:
                await wait_until_status(client, d.http_port, ws_clients=1)
            for _ in range(200):  # fill the stuck client's buffers
                await send_device(d.ports[1], b"y" * 60000 + b"\n")
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.wait(timeout=(drain + 10) * 1000 * MS)
            elapsed = time.monotonic() - started
        finally:
            for s in (device, stuck, half):
                s.close()
        assert code == -signal.SIGTERM
        assert elapsed < drain + 3.0, f"stopped after {elapsed:.2f} s"


async def wait_until_status(client: httpx.AsyncClient, port: int, *, ws_clients: int) -> None:
    async with asyncio.timeout(10_000 * MS):
        while True:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            if f"relayd_ws_clients {float(ws_clients)}" in text:
                return
            await asyncio.sleep(0.02)


# Defect 8: SIGTERM left the admin socket file behind. Defect 9: the start-up log did
# not name the HTTP address and the admin socket.


async def test_sigterm_removes_the_admin_socket_and_the_log_names_addresses(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with spawn_daemon(tmp_path, notify) as d:
        assert d.admin_socket.exists()
        d.signal(signal.SIGTERM)
        assert await d.wait() == -signal.SIGTERM
    assert not d.admin_socket.exists()
    ready = [line for line in d.output().splitlines() if "relayd ready" in line]
    assert len(ready) == 1
    assert f"HTTP on 127.0.0.1:{d.http_port}" in ready[0]
    assert f"admin socket {d.admin_socket}" in ready[0]


# Defect 9: a plain GET /ws answered 404.


async def test_plain_get_ws_says_upgrade_required(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d, httpx.AsyncClient() as client:
        answer = await client.get(f"{d.url}/ws")
        assert answer.status_code == 426
        assert answer.headers["upgrade"] == "websocket"
        assert "WebSocket" in answer.json()["detail"]
        # and an upgrade to any other path is no WebSocket endpoint
        with pytest.raises(Exception, match="404"):
            async with connect(f"ws://127.0.0.1:{d.http_port}/other"):
                pass


# Defect 6: the state file's version was never checked.


async def test_a_state_file_from_a_newer_relayd_is_refused_not_misread(
    tmp_path: Path, notify: NotifySocket
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    newer = {"version": 2, "added": [{"port": 9, "transport": "quic"}], "removed": []}
    (state / "ports.json").write_text(json.dumps(newer))
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(free_port(), [free_port()]))
    result = await asyncio.to_thread(
        subprocess.run,
        relayd_command("--config", str(cfg), "--admin-socket", str(tmp_path / "a.sock"))
        + ["--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
    )
    assert result.returncode == 78, result.stderr
    assert "format version 2, newer than this relayd understands (1)" in result.stderr
    assert json.loads((state / "ports.json").read_text()) == newer  # untouched
    assert "Traceback" not in result.stderr
