"""relayd as a subprocess: exit codes, signals, readiness and drain as systemd sees them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relayd import daemon
from tests.helpers import (
    MS,
    NotifySocket,
    accepts,
    busy_port,
    config_text,
    free_port,
    log_file,
    relayd_command,
    send_device,
    spawn_daemon,
)

pytestmark = pytest.mark.anyio


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        relayd_command(*args),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    from relayd import __version__

    result = run("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@pytest.fixture
def relayd_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Outcome]:
    """``relayd.daemon.main`` in this process, for what ends before the event loop starts;
    the process around it (``python -m relayd``) is checked by the subprocess tests."""
    monkeypatch.setattr(daemon, "configure_logging", lambda level: None)  # pytest's logging

    def call(*args: str) -> Outcome:
        code = daemon.main(list(args))
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    return call


def test_check_config_valid(tmp_path: Path, relayd_main: Callable[..., Outcome]) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(8000, [8001, 8002]))
    result = relayd_main("--check-config", "--config", str(cfg))
    assert result.code == 0, result.err
    assert result.out == f"relayd: {cfg}: configuration is valid\n"


def test_shipped_example_config_is_valid(relayd_main: Callable[..., Outcome]) -> None:
    example = Path(__file__).parents[2] / "examples" / "relayd.toml"
    assert relayd_main("--check-config", "--config", str(example)).code == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[http]\nport = 70000\n", ["http.port"]),
        ("[http]\nhots = 1\n", ["http.hots: unknown key"]),
        ('[relay]\nqueue_size = "big"\n', ["relay.queue_size"]),
        (
            "[[ports]]\nport = 9001\n[[ports]]\nport = 9001\n",
            ["ports[1].port: duplicate port 9001"],
        ),
        (
            '[[ports]]\nport = 0\nframing = "csv"\n',
            ["ports[0].port", "ports[0].framing"],
        ),
        ("[http\n", ["invalid TOML"]),
        (  # relayd.toml(5), SOURCES: one source per entry
            '[[ports]]\nport = 9001\nconnect = "192.0.2.40:4001"\nserial = "/dev/ttyS0"\n',
            ["connect and serial exclude each other"],
        ),
        (
            '[[ports]]\nport = 9001\nserial = "/dev/ttyS0"\nframing = "length"\n',
            ["ports[0]: length_prefix is required"],
        ),
    ],
)
def test_config_errors_exit_78_naming_the_key(
    tmp_path: Path, relayd_main: Callable[..., Outcome], text: str, expected: list[str]
) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(text)
    for args in (["--check-config"], []):
        result = relayd_main(*args, "--config", str(cfg), "--state-dir", str(tmp_path))
        assert result.code == 78
        lines = result.err.strip().splitlines()
        assert len(lines) == len(expected)
        for line, key in zip(lines, expected, strict=True):
            assert key in line
        assert "Traceback" not in result.err


def test_config_error_is_exit_status_78_of_the_process(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text("[http]\nhots = 1\n")
    result = run("--config", str(cfg), "--state-dir", str(tmp_path))
    assert result.returncode == 78
    assert result.stderr == "relayd: http.hots: unknown key\n"


def test_missing_config_file(tmp_path: Path, relayd_main: Callable[..., Outcome]) -> None:
    result = relayd_main("--check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.code == 78
    assert "cannot read" in result.err


async def test_port_in_use_exits_1_without_ready(tmp_path: Path, notify: NotifySocket) -> None:
    with busy_port() as busy:
        cfg = tmp_path / "relayd.toml"
        cfg.write_text(config_text(free_port(), [free_port(), busy]))
        proc = await asyncio.create_subprocess_exec(
            *relayd_command(
                "--config",
                str(cfg),
                "--admin-socket",
                str(tmp_path / "a.sock"),
                "--state-dir",
                str(tmp_path),
            ),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        )
        async with asyncio.timeout(15_000 * MS):
            _, err = await proc.communicate()
    assert proc.returncode == 1
    errors = [line for line in err.decode().splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert f"port {busy}" in errors[0] and "address already in use" in errors[0]
    assert "Traceback" not in err.decode()
    assert not any("READY=1" in m for m in notify.messages)
    with pytest.raises(TimeoutError):
        await notify.wait_for("READY=1", timeout=0.2)


@pytest.mark.xdist_group("heavy")  # a timed stop: not beside a flood
async def test_sigterm_drains_every_line_and_closes_1001(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with spawn_daemon(tmp_path, notify, nports=2) as d:
        async with connect(d.ws_url, max_queue=None) as ws:
            await asyncio.sleep(0)  # the subscription exists before the handshake completes
            n = 20_000
            loop = asyncio.get_running_loop()
            devices = [await send_device(port, close=False) for port in d.ports]
            payload = {
                port: b"".join(b"%d:%d\n" % (port, i) for i in range(n // 2)) for port in d.ports
            }
            senders = [
                asyncio.create_task(loop.sock_sendall(dev, payload[port]))
                for dev, port in zip(devices, d.ports, strict=True)
            ]
            d.signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            await notify.wait_for("STOPPING=1")
            await asyncio.gather(*senders)
            for dev in devices:
                dev.close()  # devices finish on their own during the drain
            received: list[str | bytes] = []
            async with asyncio.timeout(10_000 * MS):
                with pytest.raises(ConnectionClosed):
                    while True:
                        received.append(await ws.recv())
            assert ws.close_code == 1001
        expected = {f"{port}:{i}" for port in d.ports for i in range(n // 2)}
        assert len(received) == n
        assert set(received) == expected
        code = await d.wait()
        assert code == -signal.SIGTERM
        assert time.monotonic() - stopped_at < 2.0 + 3.0


async def test_sigterm_closes_devices_that_stay_after_the_drain_timeout(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with spawn_daemon(tmp_path, notify, nports=1) as d:
        async with connect(d.ws_url, max_queue=None) as ws:
            device = await send_device(d.ports[0], b"done\nhalf a li", close=False)
            assert await asyncio.wait_for(ws.recv(), 5) == "done"
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            # The device never closes: after drain.timeout (2 s) relayd closes it, and the
            # partial line it had read is delivered as a last message.
            assert await asyncio.wait_for(ws.recv(), 10) == "half a li"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
            assert time.monotonic() - started >= 1.5
            device.close()
        assert await d.wait() == -signal.SIGTERM


async def test_sigint_is_a_clean_stop(tmp_path: Path, notify: NotifySocket) -> None:
    async with spawn_daemon(tmp_path, notify, nports=1) as d:
        d.signal(signal.SIGINT)
        assert await d.wait() == 0
        assert "Traceback" not in d.output()


async def test_sighup_reconciles_ports(tmp_path: Path, notify: NotifySocket) -> None:
    async with spawn_daemon(tmp_path, notify, nports=2) as d:
        keep, drop = d.ports
        new = free_port()
        async with connect(d.ws_url, max_queue=None) as ws:
            device = await send_device(keep, b"before\n", close=False)
            assert await asyncio.wait_for(ws.recv(), 5) == "before"
            text = config_text(d.http_port, [keep, new])
            d.config.write_text(text)
            d.signal(signal.SIGHUP)
            reloading = await notify.wait_for("RELOADING=1")
            assert "MONOTONIC_USEC=" in reloading
            await notify.wait_for("READY=1")
            loop = asyncio.get_running_loop()
            # The connection on the unchanged port survived and still relays.
            await loop.sock_sendall(device, b"after\n")
            assert await asyncio.wait_for(ws.recv(), 5) == "after"
            await send_device(new, b"new port\n")
            assert await asyncio.wait_for(ws.recv(), 5) == "new port"
            assert not await accepts(drop)
            # An invalid config is rejected, and everything keeps running.
            d.config.write_text(text + "[bogus]\n")
            d.signal(signal.SIGHUP)
            await notify.wait_for("RELOADING=1")
            await notify.wait_for("READY=1")
            await loop.sock_sendall(device, b"still\n")
            assert await asyncio.wait_for(ws.recv(), 5) == "still"
            device.close()
        assert "reload rejected: bogus: unknown key" in d.output()


async def test_watchdog_is_fed(tmp_path: Path, notify: NotifySocket) -> None:
    env = {"WATCHDOG_USEC": "200000"}
    async with spawn_daemon(tmp_path, notify, nports=1, env=env):
        for _ in range(3):
            await notify.wait_for("WATCHDOG=1", timeout=2_000 * MS)


async def test_journald_log_format(tmp_path: Path, notify: NotifySocket) -> None:
    env = {"JOURNAL_STREAM": "8:12345"}
    async with spawn_daemon(tmp_path, notify, nports=1, env=env) as d:
        pass
    await d.wait()
    lines = d.output().splitlines()
    assert lines
    for line in lines:
        assert line[:3] in ("<6>", "<4>", "<3>", "<7>"), line
    assert any("ready" in line for line in lines)


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("relayd targets Linux", allow_module_level=True)


def _nofile_soft(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


async def test_start_raises_the_soft_fd_limit_to_the_hard_one(
    tmp_path: Path, notify: NotifySocket
) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE above 256 (have {hard})")

    def low_soft_limit() -> None:  # runs in the child before exec, as systemd's 1024 would
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(free_port(), [free_port()]))
    log = tmp_path / "relayd.log"
    out = log_file(log)
    try:
        proc = await asyncio.create_subprocess_exec(
            *relayd_command(
                "--config",
                str(cfg),
                "--admin-socket",
                str(tmp_path / "a.sock"),
                "--state-dir",
                str(tmp_path),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
            preexec_fn=low_soft_limit,
        )
    finally:
        out.close()
    try:
        await notify.wait_for("READY=1", timeout=15_000 * MS)
        assert _nofile_soft(proc.pid) == hard
        assert f"file descriptor limit raised from 256 to {hard}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15_000 * MS):
            await proc.wait()
    assert proc.returncode == -signal.SIGTERM  # as every clean SIGTERM stop
