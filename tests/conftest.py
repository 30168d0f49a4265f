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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``xdist_group`` marks take effect again on pytest >= 9.2.

    ``--dist loadgroup`` sends the tests of one group to one worker by the ``@group``
    suffix pytest-xdist appends to their node ids in a worker. It sets ``item._nodeid``,
    which pytest 9.2's structured node ids no longer read: every mark was silently
    ignored and the "heavy" tests ran side by side (pytest-xdist issue 1386). This sets
    the same suffix through the structured id, and refuses to run when it cannot, so
    that a change on either side is an error rather than flaky timed tests.
    """
    if not getattr(config.option, "loadgroup", False):
        return  # not an xdist worker with --dist loadgroup
    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        node_id = getattr(item, "_id", None)
        if node_id is not None and hasattr(node_id, "parse"):
            item._id = type(node_id).parse(item.nodeid + suffix)
        if not item.nodeid.endswith(suffix):
            raise pytest.UsageError(
                f"--dist loadgroup cannot group {item.nodeid} with this pytest and "
                "pytest-xdist: see pytest_collection_modifyitems in tests/conftest.py"
            )


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
