"""The notifier: non-blocking sd_notify, watchdog interval."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from relayd.systemd import Notifier


def test_a_service_manager_that_does_not_read_never_blocks_relayd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:
        unread.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notifier = Notifier()
        started = time.monotonic()
        for i in range(500):  # far more than the kernel queues (net.unix.max_dgram_qlen)
            notifier.status(f"relaying {i} ports, 0 clients")
        assert time.monotonic() - started < 5
        assert notifier.dropped > 0
        assert unread.recv(100) == b"STATUS=relaying 0 ports, 0 clients"
        notifier.close()


def test_messages_and_status_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notifier = Notifier()
        notifier.ready()
        notifier.status("a")
        notifier.status("a")  # unchanged: not sent again
        notifier.reloading()
        notifier.stopping()
        got = [manager.recv(200).decode() for _ in range(4)]
        notifier.close()
    assert got[0] == "READY=1"
    assert got[1] == "STATUS=a"
    assert got[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert got[3] == "STOPPING=1"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    notifier.ready()
    notifier.status("x")
    assert notifier.watchdog_interval() is None
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("2000000", None, 1.0), ("0", None, None), ("junk", None, None), ("2000000", "1", None)],
)
def test_watchdog_interval(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    usec: str,
    pid: str | None,
    expected: float | None,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "n.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        monkeypatch.setenv("WATCHDOG_PID", pid if pid is not None else str(os.getpid()))
        notifier = Notifier()
        assert notifier.watchdog_interval() == expected
        notifier.close()
