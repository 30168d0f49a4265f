"""Fixtures: the anyio backend, systemd's notify socket, a relayd shared by a module.

The helpers themselves (daemon starters, sockets, waits) are in tests/helpers.py;
the names below stay importable from here for older test modules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import MS as MS
from tests.helpers import Daemon as Daemon
from tests.helpers import DaemonProcess as DaemonProcess
from tests.helpers import NotifySocket as NotifySocket
from tests.helpers import config_text as config_text
from tests.helpers import examples
from tests.helpers import free_port as free_port
from tests.helpers import log_file as log_file
from tests.helpers import relayd_command as relayd_command
from tests.helpers import run_daemon as run_daemon
from tests.helpers import send_device as send_device
from tests.helpers import spawn_daemon as spawn_daemon
from tests.helpers import wait_until as wait_until
from tests.helpers import write_config as write_config

# Property tests without settings of their own: 25 examples in `make test`, hypothesis'
# 100 with RELAYD_TEST_THOROUGH=1. No per-example deadline: the suite shares its cores.
settings.register_profile("relayd", max_examples=examples(100), deadline=None)
settings.load_profile("relayd")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module scope, so that a module can share one daemon (``shared_daemon``); each
    # test still gets an event loop of its own unless it uses a module-scoped fixture.
    return "asyncio"


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    yield sock
    sock.close()


@pytest.fixture(scope="module")
async def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    """One relayd (two config ports, default settings) for a module's cheap tests.

    Tests that use it leave it as they found it: they add ports of their own
    (``free_port()``) and remove them again, and never change its config ports.
    Its notifications are read throughout, so none is left for a test to await.
    """
    tmp = tmp_path_factory.mktemp("shared")
    notify = NotifySocket(tmp / "notify.sock")
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("NOTIFY_SOCKET", str(notify.path))  # read once, at start
            async with run_daemon(tmp, notify) as d:
                env.undo()
                async with notify.drained():
                    yield d
    finally:
        notify.close()
