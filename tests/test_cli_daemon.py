"""relayctl against the real relayd over its real socket.

tests/test_cli.py checks relayctl's output against a fake daemon; here every
command and every exit code of relayctl(1) is checked end to end: the admin API
on the Unix socket (or on the HTTP port with a token), and the WebSocket that
``tail`` subscribes to. Most commands run relayctl's app in this process
(``ctl``, ``inproc``: a thread, so that the in-process relayd keeps serving);
what needs the installed console script as a process of its own runs it so
(``relayctl``): usage errors and ``--version``, Ctrl-C and SIGTERM during
``tail``, a socket's file mode applying to relayctl run without root's privileges.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from relayd import __version__, cli, daemon
from relayd.config import Settings
from tests.helpers import (
    MS,
    Daemon,
    NotifySocket,
    busy_port,
    config_port,
    free_port,
    run_daemon,
    send_device,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.anyio

RELAYCTL = str(Path(sys.executable).with_name("relayctl"))

# One relayctl run starts a Python interpreter; bounded generously for slow machines.
RUN_TIMEOUT = 30_000 * MS


@dataclass
class Result:
    code: int
    out: str
    err: str


def ctl_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The operator's environment: no RELAYCTL_* leaking in from outside, no colour.

    PYTHONASYNCIODEBUG (set by `make pytest` for the daemon) is not the operator's:
    its slow-callback warnings would land on relayctl's stderr.
    """
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYCTL_") and k != "PYTHONASYNCIODEBUG"
    }
    return {**base, "NO_COLOR": "1", **(env or {})}


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err
    assert 'File "' not in err, err


async def start(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *prefix,
        RELAYCTL,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(env),
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = RUN_TIMEOUT) -> Result:
    """Collect a relayctl run; a run that hangs is killed and fails the test."""
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    no_traceback(result.err)
    return result


async def relayctl(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> Result:
    return await finish(await start(*args, env=env, prefix=prefix))


def invoke(args: Sequence[str], env: dict[str, str] | None, stdin: bytes | None) -> Result:
    kwargs: dict[str, Any] = {}
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        kwargs["mix_stderr"] = False  # click 8.1 (typer 0.15); later ones keep them apart
    # The operator's environment as ctl_env() makes it: no RELAYCTL_* from outside.
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAYCTL_")}
    run = CliRunner(**kwargs).invoke(
        cli.app,
        list(args),
        input=stdin,
        env={**unset, "NO_COLOR": "1", **(env or {})},
        prog_name="relayctl",
    )
    if run.exception is not None and not isinstance(run.exception, SystemExit):
        raise run.exception
    result = Result(run.exit_code, run.stdout, run.stderr)
    no_traceback(result.err)
    return result


async def inproc(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> Result:
    """relayctl's app in this process, in a thread: the in-process relayd keeps serving.

    CliRunner swaps sys.stdout and os.environ while it runs: await one at a time.
    """
    async with asyncio.timeout(RUN_TIMEOUT):
        return await asyncio.to_thread(invoke, args, env, stdin)


async def ctl(d: Daemon, *args: str, stdin: bytes | None = None) -> Result:
    """relayctl (in process) against ``d``'s admin socket."""
    return await inproc("--socket", str(d.admin_socket), *args, stdin=stdin)


def refused(result: Result, detail: str) -> None:
    """Exit 1 with relayd's detail as the one line on stderr (relayctl(1))."""
    assert (result.code, result.out, result.err) == (1, "", f"relayctl: {detail}\n")


def table_rows(text: str) -> dict[str, list[str]]:
    """A relayctl table keyed by its first column."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


@contextlib.asynccontextmanager
async def tailing(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A running ``relayctl … tail``; killed if the test leaves it running."""
    proc = await start(*args)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def next_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(5_000 * MS):
        line = await proc.stdout.readline()
    assert line, "relayctl tail ended without printing the message"
    return line.decode().rstrip("\n")


@contextlib.asynccontextmanager
async def relayd(tmp_path: Path, notify: NotifySocket, **kwargs: Any) -> AsyncIterator[Daemon]:
    """relayd in-process (helpers.run_daemon), with its notifications read."""
    async with run_daemon(tmp_path, notify, **kwargs) as d, notify.drained():
        yield d


# --- reading: status, ports list, ports show, RELAYCTL_SOCKET ---------------------


async def test_status_list_and_show(tmp_path: Path, notify: NotifySocket) -> None:
    async with relayd(tmp_path, notify) as d:
        a, b = sorted(d.ports)
        results = [
            await ctl(d, "status"),
            await ctl(d, "status", "--json"),
            await ctl(d, "ports", "list"),
            await ctl(d, "ports", "list", "--json"),
            await ctl(d, "ports", "show", str(a)),
            await ctl(d, "ports", "show", "1"),
            await inproc("ports", "list", env={"RELAYCTL_SOCKET": str(d.admin_socket)}),
            await inproc("--url", d.url, "status"),  # the HTTP port without admin.token_file
        ]
        status, status_json, listed, listed_json, shown, unknown, from_env, no_admin = results

        assert (status.code, status.err) == (0, ""), status
        lines = dict(line.split(None, 1) for line in status.out.splitlines()[:4])
        assert lines["state"] == "ready"
        assert lines["pid"] == str(os.getpid())  # the in-process daemon
        assert f"http             127.0.0.1:{d.http_port}" in status.out
        assert "ports            2" in status.out
        assert table_rows(status.out)[str(a)][1] == f"dev-{a}"  # and the ports table

        assert (status_json.code, status_json.err) == (0, "")
        info = json.loads(status_json.out)
        assert info["state"] == "ready" and info["ports"] == 2 and info["pid"] == os.getpid()
        assert info["http"] == f"127.0.0.1:{d.http_port}"

        assert (listed.code, listed.err) == (0, "")
        rows = table_rows(listed.out)
        assert rows["PORT"] == [
            "PORT", "NAME", "HOST", "FRAMING", "MAXCONN", "STATE", "SOURCE", "CONNS", "MESSAGES",
            "BYTES",
        ]  # fmt: skip
        for port in (a, b):
            assert rows[str(port)] == [
                str(port), f"dev-{port}", "127.0.0.1", "lines", "64", "listening", "config",
                "0", "0", "0", "B",
            ]  # fmt: skip
        assert list(rows) == ["PORT", str(a), str(b)]
        header, first = listed.out.splitlines()[:2]
        assert header.index("NAME") == first.index("dev-")  # aligned columns

        assert (listed_json.code, listed_json.err) == (0, "")
        ports = json.loads(listed_json.out)
        assert [p["port"] for p in ports] == [a, b]
        assert ports[0] == config_port(a)

        assert (shown.code, shown.err) == (0, "")
        fields = dict(line.split(None, 1) for line in shown.out.splitlines())
        assert fields["port"] == str(a)
        assert fields["name"] == f"dev-{a}"
        assert fields["framing"] == "lines"
        assert "max connections  64" in shown.out

        refused(unknown, "port 1 is not a listener")

        assert (from_env.code, from_env.err) == (0, "")
        assert from_env.out == listed.out

        assert no_admin.code == 1
        assert no_admin.err.startswith("relayctl: ") and no_admin.err.count("\n") == 1
        assert "does not serve the admin API" in no_admin.err


# --- changing: ports add, ports remove --------------------------------------------


async def test_add_and_remove_ports(tmp_path: Path, notify: NotifySocket) -> None:
    async with relayd(tmp_path, notify, nports=1) as d, d.admin() as admin:
        port = free_port()
        added = await ctl(
            d, "ports", "add", str(port), "--host", "127.0.0.1", "--name", "scale-9",
            "--framing", "raw", "--max-connections", "5",
        )  # fmt: skip
        assert added == Result(0, f"port {port} listening (scale-9)\n", "")
        got = (await admin.get(f"/v1/ports/{port}")).json()
        assert got["framing"] == "raw" and got["max_connections"] == 5
        assert got["source"] == "runtime" and got["host"] == "127.0.0.1"

        with busy_port() as busy:
            again = await ctl(d, "ports", "add", str(port), "--host", "127.0.0.1")
            in_use = await ctl(d, "ports", "add", str(busy), "--host", "127.0.0.1")
        refused(again, f"port {port} is already a listener")
        refused(in_use, f"port {busy}: address already in use")
        assert (await admin.get(f"/v1/ports/{busy}")).status_code == 404

        # A device's message, delivered, so the final counters are not all zero.
        async with tailing("--socket", str(d.admin_socket), "tail", "--port", str(port)) as tail:
            await wait_status(admin, "ws_clients", 1)
            await send_device(port, b"12.5 kg")
            assert await next_line(tail) == "12.5 kg"
            tail.send_signal(signal.SIGINT)
            assert (await finish(tail)).code in (0, 130)

        removed = await ctl(d, "ports", "remove", str(port))
        assert (removed.code, removed.out) == (
            0,
            f"port {port} (scale-9) removed: 1 messages, 7 B received\n",
        )
        limit = (await admin.get("/v1/status")).json().get("drain_timeout")  # or not (yet)
        assert removed.err == (
            f"relayctl: port {port} (scale-9) is draining: devices still connected get up to"
            f" {'drain.timeout' if limit is None else f'{limit:g} s'} to close\n"
        )
        refused(await ctl(d, "ports", "remove", str(port)), f"port {port} is not a listener")
        refused(await ctl(d, "ports", "show", str(port)), f"port {port} is not a listener")


async def test_remove_force_skips_the_drain(tmp_path: Path, notify: NotifySocket) -> None:
    async with relayd(tmp_path, notify, nports=1, drain=60.0) as d:
        port = d.ports[0]
        device = await send_device(port, b"x\n", close=False)
        try:
            await wait_until(lambda: d.runtime.registry.tcp_connections == 1)
            # Without --force this would wait the full 60 s drain for the device.
            removed = await ctl(d, "ports", "remove", str(port), "--force")
        finally:
            device.close()
        assert removed.code == 0, removed
        assert removed.out.startswith(f"port {port} (dev-{port}) removed: ")
        assert removed.err == ""


async def test_port_out_of_range_is_a_usage_error_before_any_request(tmp_path: Path) -> None:
    # A socket that would see any request relayctl made.
    sentinel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sentinel:
        sentinel.bind(str(tmp_path / "sentinel.sock"))
        sentinel.listen(16)
        sentinel.setblocking(False)
        where = ("--socket", str(tmp_path / "sentinel.sock"))
        # One of each kind as an installed command; test_cli.py checks every usage error
        # in process (tail's among them).
        version, *results = await asyncio.gather(
            relayctl(*where, "--version"),
            relayctl(*where, "ports", "add", "70000", "--name", "x"),
            relayctl(*where),  # no command
        )
        assert version == Result(0, f"relayctl {__version__}\n", "")
        for result in results:
            assert result.code == 2, result
            assert result.out == ""
            assert "Usage: relayctl" in result.err
        assert "70000 is not a port number (1-65535)" in results[0].err
        with pytest.raises(BlockingIOError):
            sentinel.accept()  # nobody connected


# --- reload -------------------------------------------------------------------------


async def test_reload(tmp_path: Path, notify: NotifySocket) -> None:
    async with relayd(tmp_path, notify, nports=1) as d:
        original = d.config.read_text()
        new_port = free_port()
        d.config.write_text(original + f'[[ports]]\nport = {new_port}\nhost = "127.0.0.1"\n')
        assert await ctl(d, "reload") == Result(0, f"reloaded: added {new_port}\n", "")
        assert await ctl(d, "reload") == Result(0, "reloaded: no changes\n", "")

        with busy_port() as busy:
            d.config.write_text(
                d.config.read_text() + f'[[ports]]\nport = {busy}\nhost = "127.0.0.1"\n'
            )
            partial = await ctl(d, "reload")
        assert partial == Result(
            1, "reloaded: no changes\n", f"relayctl: port {busy}: address already in use\n"
        )

        d.config.write_text(original + "\n[relay]\nqueue_size = -1\n")
        invalid = await ctl(d, "reload")
        assert (invalid.code, invalid.out) == (1, "")
        assert invalid.err.startswith("relayctl: ") and invalid.err.count("\n") == 1
        assert "relay.queue_size" in invalid.err
        listed = json.loads((await ctl(d, "ports", "list", "--json")).out)
        assert {p["port"] for p in listed} == {d.ports[0], new_port}  # nothing changed


# --- tail ---------------------------------------------------------------------------


async def test_tail_prints_messages_until_ctrl_c_or_the_daemon_stops(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with relayd(tmp_path, notify) as d, d.admin() as admin:
        one, other = d.ports
        sock = ("--socket", str(d.admin_socket))
        unknown = await inproc(*sock, "tail", "--port", "1")  # relayd closes it with 1008
        assert (unknown.code, unknown.out) == (1, ""), unknown
        assert unknown.err.startswith("relayctl: ") and unknown.err.count("\n") == 1
        assert "unknown port 1" in unknown.err
        async with (
            tailing(*sock, "tail", "--port", str(one)) as bare,
            tailing(*sock, "tail", "--json") as every,
        ):
            await wait_status(admin, "ws_clients", 2)
            await send_device(other, b"from the other port\n")
            assert json.loads(await next_line(every))["data"] == "from the other port"
            await send_device(one, b"hello\n", b"bin\x00\xff\x1b[2J\n")
            # --port: the other port's message, relayed before these, is not shown.
            assert await next_line(bare) == "hello"
            assert await next_line(bare) == "bin\\x00\\xff\\x1b[2J"  # escaped, never raw
            envelope = json.loads(await next_line(every))
            assert envelope["port"] == one and envelope["name"] == f"dev-{one}"
            assert envelope["data"] == "hello"
            assert "data_b64" in json.loads(await next_line(every))

            bare.send_signal(signal.SIGINT)  # Ctrl-C
            stopped = await finish(bare, timeout=10_000 * MS)
            assert stopped.code in (0, 130), stopped
            assert stopped.out == ""  # everything was read above
            assert stopped.err.count("\n") <= 1

            await wait_status(admin, "ws_clients", 1)
            assert await d.stop() == 0
            gone = await finish(every, timeout=10_000 * MS)
        assert gone.code == 69, gone
        assert gone.out == ""
        assert gone.err.startswith("relayctl: ") and gone.err.count("\n") == 1
        assert "relayd closed the connection (going away" in gone.err


# --- send: a device reads what relayctl wrote ---------------------------------------


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(5_000 * MS):
        return await reader.readexactly(n)


async def test_send_reaches_the_devices(tmp_path: Path, notify: NotifySocket) -> None:
    port = free_port()
    extra = f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\ndownlink = true\n'
    async with relayd(tmp_path, notify, nports=1, extra=extra) as d:
        (r1, w1), (r2, w2) = [await asyncio.open_connection("127.0.0.1", port) for _ in "12"]
        try:
            await wait_until(lambda: len(d.runtime.registry.get(port).connections) == 2)
            assert await ctl(d, "send", str(port), "TARE") == Result(0, "sent to 2 device(s)\n", "")
            for reader in (r1, r2):
                assert await read_exactly(reader, 5) == b"TARE\n"  # lines: a newline added

            peer = f"127.0.0.1:{w2.get_extra_info('sockname')[1]}"
            one = await ctl(d, "send", str(port), "ZERO", "--peer", peer)
            assert one == Result(0, "sent to 1 device(s)\n", "")
            assert await read_exactly(r2, 5) == b"ZERO\n"

            # Bytes that are not UTF-8, on stdin, up to what a device may be sent
            # (relay.max_message): they go as data_b64 and arrive unchanged. (A pipe into
            # the installed relayctl: tests/test_cli_send.py.)
            blob = bytes(range(256)) * 255 + b"\n"
            piped = await ctl(d, "send", str(port), "--file", "-", stdin=blob)
            assert piped == Result(0, "sent to 2 device(s)\n", "")
            for reader in (r1, r2):
                assert await read_exactly(reader, len(blob)) == blob

            refused(
                await ctl(d, "send", str(d.ports[0]), "TARE"),
                f"port {d.ports[0]}: downlink is off on port {d.ports[0]}",
            )
            refused(
                await ctl(d, "send", str(port), "TARE", "--peer", "192.0.2.1:1"),
                f"port {port}: no peer 192.0.2.1:1 is connected to port {port}",
            )
        finally:
            w1.close()
            w2.close()


# --- --url and --token, with admin.token_file set; a stop during tail ----------------
# (The stop as SIGTERM does it, in process: the signal itself reaches a relayd process in
# tests/e2e/test_process.py, whose WebSocket clients get the same 1001.)


async def test_url_and_token_against_the_http_port(tmp_path: Path, notify: NotifySocket) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret\n")
    extra = f'[admin]\ntoken_file = "{token_file}"\n'
    # What relayd's main() reads from admin.token_file (the trailing newline dropped).
    (tmp_path / "token-only.toml").write_text(extra)
    token = daemon.read_token(Settings.load(tmp_path / "token-only.toml"))
    assert token == "s3cret"
    async with relayd(tmp_path, notify, nports=1, extra=extra, admin_token=token) as d:
        url = d.url
        port = d.ports[0]
        ok = await inproc("--url", url, "--token", "s3cret", "status", "--json")
        listed = await inproc("--url", url + "/", "--token", "s3cret", "ports", "list")
        from_env = await inproc(
            "ports", "show", str(port), env={"RELAYCTL_URL": url, "RELAYCTL_TOKEN": "s3cret"}
        )
        bad = await inproc("--url", url, "--token", "nope", "status")
        missing = await inproc("--url", url, "ports", "list")
        assert (ok.code, ok.err) == (0, ""), ok
        assert json.loads(ok.out)["state"] == "ready"
        assert (listed.code, listed.err) == (0, ""), listed
        assert str(port) in table_rows(listed.out)
        assert (from_env.code, from_env.err) == (0, ""), from_env
        assert f"dev-{port}" in from_env.out
        refused(bad, "a valid bearer token is required")
        refused(missing, "a valid bearer token is required")

        added_port = free_port()
        added = await inproc(
            "--url",
            url,
            "--token",
            "s3cret",
            "ports",
            "add",
            str(added_port),
            "--host",
            "127.0.0.1",
        )
        assert added == Result(0, f"port {added_port} listening\n", "")

        async with (
            d.admin() as admin,
            tailing("--url", url, "--token", "s3cret", "tail", "--json") as over_http,
            tailing(
                "--socket", str(d.admin_socket), "tail", "--port", str(added_port)
            ) as over_socket,
        ):
            await wait_status(admin, "ws_clients", 2)
            await send_device(added_port, b"via http\n")
            assert json.loads(await next_line(over_http))["data"] == "via http"
            assert await next_line(over_socket) == "via http"
            assert await d.stop() == 0
            results = await asyncio.gather(
                finish(over_http, timeout=10_000 * MS), finish(over_socket, timeout=10_000 * MS)
            )
        for gone in results:
            assert gone.code == 69, gone
            assert gone.err.startswith("relayctl: ") and gone.err.count("\n") == 1, gone
            assert "relayd closed the connection (going away" in gone.err


# --- relayd cannot be reached -------------------------------------------------------


async def without_file_permissions() -> list[str]:
    """A command prefix under which a socket's file mode applies to relayctl.

    Not root: none is needed. Root: setpriv drops the two capabilities that
    bypass file modes but stays root, so relayctl still reads the checkout
    and its .venv wherever they are, also in a private (0700) directory,
    which a run as nobody could not. Skips the test when it cannot be arranged.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv(1): a socket's file mode cannot be made to apply")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = await start("--version", prefix=prefix)
    async with asyncio.timeout(RUN_TIMEOUT):
        _, err = await probe.communicate()
    if probe.returncode != 0:
        pytest.skip(f"relayctl cannot run without root's file access: {err.decode().strip()}")
    return prefix


async def test_unreachable_daemon_exits_69_with_a_hint(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    stale = tmp_path / "stale.sock"  # left behind by a relayd that died: nobody listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    results = [
        await inproc("--socket", str(missing), "status"),
        await inproc("--socket", str(missing), "tail"),
        await inproc("--socket", str(stale), "ports", "add", "8004"),
        await inproc("--url", f"http://127.0.0.1:{free_port()}", "--token", "t", "reload"),
    ]
    for result in results:
        assert result.code == 69, result
        assert result.out == ""
        assert result.err.startswith("relayctl: cannot reach relayd at "), result
        assert result.err.count("\n") == 1
    no_file, tail, refused_conn, no_http = results
    assert no_file.err == (
        f"relayctl: cannot reach relayd at {missing}: No such file or directory"
        " (is relayd running?)\n"
    )
    assert tail.err.endswith("(is relayd running?)\n") and str(missing) in tail.err
    assert refused_conn.err == (
        f"relayctl: cannot reach relayd at {stale}: Connection refused (is relayd running?)\n"
    )
    assert no_http.err.endswith("(is relayd running?)\n")


async def test_socket_without_permission_exits_69_asking_about_the_group(
    tmp_path: Path,
) -> None:
    prefix = await without_file_permissions()
    locked = tmp_path / "locked.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(locked))
        listening.listen(16)
        os.chmod(locked, 0)
        results = await asyncio.gather(
            relayctl("--socket", str(locked), "status", prefix=prefix),
            relayctl("--socket", str(locked), "tail", prefix=prefix),
        )
    expected = (
        f"relayctl: cannot reach relayd at {locked}: Permission denied"
        " (are you in the relayd group?)\n"
    )
    for result in results:
        assert (result.code, result.out, result.err) == (69, "", expected), result
