"""relayctl: every command, exit code and error path (relayctl(1)).

Two layers:

* ``CliRunner`` with an ``httpx.MockTransport`` passed as ``obj``: what is
  sent, what is printed, which exit code, without any socket.
* The installed ``relayctl`` as a subprocess (and ``tail`` in process) against
  ``FakeRelayd``: a small asyncio server on a Unix socket in a temporary
  directory, plus 127.0.0.1:0 for ``--url``, that answers the admin API routes of relayd(8)
  and ``/ws`` (WebSocket through websockets' sans-I/O ``ServerProtocol``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import inspect
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, CloseCode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from relayd import __version__, cli, cli_output, cli_transport, parsing

TIMEOUT = 10.0 * float(os.environ.get("RELAYD_TEST_TIMEOUT_SCALE", "1"))
RELAYCTL = Path(sys.executable).with_name("relayctl")
# httpcore (1.0.9) leaves the socket of a failed Unix-socket connect to the garbage
# collector; relayctl exits right after, so only the tests see the ResourceWarning.
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")

NO_ENV: dict[str, str | None] = {
    "RELAYCTL_SOCKET": None,
    "RELAYCTL_URL": None,
    "RELAYCTL_TOKEN": None,
    **dict.fromkeys(("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")),
}


# --- the fake daemon ---------------------------------------------------------------


def port_object(port: int, **overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "port": port,
        "host": "0.0.0.0",
        "name": None,
        "framing": "lines",
        "max_connections": 64,
        "state": "listening",
        "source": "runtime",
        "connections": 0,
        "messages_received": 0,
        "bytes_received": 0,
    }
    obj.update(overrides)
    return obj


def token_object(name: str, **overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": name,
        "read": "*",
        "write": [],
        "created": "2026-11-30T09:00:00Z",
        "expires": None,
        "last_used": None,
    }
    obj.update(overrides)
    return obj


@dataclass
class Seen:
    """One admin request as the fake daemon received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorization: str | None


@dataclass
class FakeState:
    """Admin API answers (relayd(8)), shared by the MockTransport and the socket server."""

    token: str | None = None  # over TCP the admin API needs it; None: 404 there
    ports: dict[int, dict[str, Any]] = field(
        default_factory=lambda: {
            8001: port_object(
                8001,
                name="scale-1",
                source="config",
                connections=2,
                messages_received=12,
                bytes_received=1234,
            ),
            8002: port_object(8002, framing="raw", source="config", max_connections=8),
        }
    )
    busy: set[int] = field(default_factory=set)  # binding these fails
    drain_timeout: float | None = 5.0  # None: a relayd whose status lacks the field
    reload_result: dict[str, Any] = field(
        default_factory=lambda: {"added": [], "removed": [], "changed": [], "failed": []}
    )
    reload_error: str | None = None
    tokens: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "dash": token_object("dash"),
            "scales": token_object(
                "scales",
                read=[8001, 8002],
                write=[8001],
                expires="2026-12-30T09:00:00Z",
                last_used="2026-12-01T10:11:12Z",
            ),
        }
    )
    # downlink: the ports with downlink = true and how many devices take a write
    downlink: dict[int, int] = field(default_factory=lambda: {8001: 2})
    seen: list[Seen] = field(default_factory=list)

    def answer(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        *,
        via_tcp: bool = False,
    ) -> tuple[int, Any]:
        split = urlsplit(target)
        path = split.path
        auth = headers.get("authorization")
        payload = json.loads(body) if body else None
        self.seen.append(Seen(method, path, parse_qs(split.query), payload, auth))
        if via_tcp and self.token is None:
            return 404, {"detail": "Not Found"}
        if via_tcp and auth != f"Bearer {self.token}":
            return 401, {"detail": "missing or invalid bearer token"}
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/v1/status"):
            status = {
                "version": __version__,
                "pid": 4242,
                "uptime_s": 3723.5,
                "state": "ready",
                "http": "127.0.0.1:8000",
                "ports": len(self.ports),
                "tcp_connections": sum(p["connections"] for p in self.ports.values()),
                "ws_clients": 1,
            }
            if self.drain_timeout is not None:
                status["drain_timeout"] = self.drain_timeout
            return 200, status
        if (method, path) == ("GET", "/v1/ports"):
            return 200, [self.ports[p] for p in sorted(self.ports)]
        if (method, path) == ("POST", "/v1/ports"):
            return self._add(payload)
        if (method, path) == ("POST", "/v1/reload"):
            if self.reload_error is not None:
                return 422, {"detail": self.reload_error}
            return 200, self.reload_result
        if (method, path) == ("GET", "/v1/tokens"):
            return 200, [self.tokens[n] for n in sorted(self.tokens)]
        if (method, path) == ("POST", "/v1/tokens"):
            return self._add_token(payload)
        if len(parts) == 3 and parts[:2] == ["v1", "tokens"] and method == "DELETE":
            name = unquote(parts[2])
            if name not in self.tokens:
                return 404, {"detail": f"no token named {name!r}"}
            return 200, self.tokens.pop(name)
        if len(parts) == 4 and parts[:2] == ["v1", "ports"] and parts[3] == "send":
            return self._send(int(parts[2]), payload)
        if len(parts) == 3 and parts[:2] == ["v1", "ports"] and parts[2].isdigit():
            port = int(parts[2])
            if port not in self.ports:
                return 404, {"detail": f"port {port} is not a listener"}
            if method == "GET":
                return 200, self.ports[port]
            if method == "DELETE":
                return 200, self.ports.pop(port) | {"state": "draining", "connections": 0}
        return 404, {"detail": "Not Found"}

    def _add(self, body: Any) -> tuple[int, Any]:
        port = body.get("port") if isinstance(body, dict) else None
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return 422, {"detail": "port must be a number from 1 to 65535"}
        if port in self.ports:
            return 409, {"detail": f"port {port} is already a listener"}
        if port in self.busy:
            return 409, {"detail": f"port {port}: address already in use"}
        self.ports[port] = port_object(port, **{k: v for k, v in body.items() if k != "port"})
        return 201, self.ports[port]

    def _send(self, port: int, body: Any) -> tuple[int, Any]:
        """POST /v1/ports/{port}/send as relayd(8) has it, but for the devices."""
        if not isinstance(body, dict) or set(body) - {"data", "data_b64", "peer"}:
            return 422, {"detail": "invalid request: unknown field"}
        if ("data" in body) == ("data_b64" in body):
            return 422, {"detail": 'invalid request: give exactly one of "data" and "data_b64"'}
        if port not in self.ports:
            return 404, {"detail": f"port {port} is not a listener"}
        if port not in self.downlink:
            return 409, {"detail": f"port {port}: downlink is off on port {port}"}
        peer = body.get("peer")
        if peer is not None and peer != "192.0.2.7:51234":
            return 409, {"detail": f"port {port}: no peer {peer} is connected to port {port}"}
        return 200, {"delivered": 1 if peer else self.downlink[port]}

    def _add_token(self, body: Any) -> tuple[int, Any]:
        """POST /v1/tokens as relayd(8) has it, checks and all."""
        if not isinstance(body, dict) or set(body) - {"name", "read", "write", "expires_in"}:
            return 422, {"detail": "a token needs a name, and only read, write, expires_in"}
        try:
            name = parsing.check_token_name(body.get("name"))
            read = parsing.ports_from_json(body.get("read", "*"))
            write = parsing.ports_from_json(body.get("write", []))
        except ValueError as exc:
            return 422, {"detail": str(exc)}
        expires_in = body.get("expires_in")
        if expires_in is not None and not (type(expires_in) is int and expires_in > 0):
            return 422, {"detail": "expires_in must be a positive number of seconds"}
        if name in self.tokens:
            return 409, {"detail": f"a token named {name!r} exists"}
        self.tokens[name] = token_object(
            name,
            read=parsing.ports_to_json(read),
            write=parsing.ports_to_json(write),
            expires=None if expires_in is None else f"in {expires_in}s",
        )
        return 201, self.tokens[name] | {"token": f"rlyd_{name}-{len(self.tokens)}"}


def mock(state: FakeState, *, via_tcp: bool = False) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        status, payload = state.answer(
            request.method,
            str(request.url.raw_path, "ascii"),
            {k.lower(): v for k, v in request.headers.items()},
            request.content,
            via_tcp=via_tcp,
        )
        return httpx.Response(status, json=payload)

    return httpx.MockTransport(handle)


def still_open(proto: ServerProtocol) -> bool:
    return proto.state is not State.CLOSED


@dataclass
class Subscriber:
    proto: ServerProtocol
    writer: asyncio.StreamWriter
    ports: list[int]
    json: bool
    authorization: str | None
    query: dict[str, list[str]] = field(default_factory=dict)


# What the fake does to a new subscriber: ("send", text or bytes), ("close", code,
# reason), ("drop",) to cut the connection without a close frame.
Action = tuple[Any, ...]


class FakeRelayd:
    """A stand-in for relayd's admin socket (and HTTP port), served from a thread."""

    def __init__(self, state: FakeState, path: Path) -> None:
        self.state = state
        self.path = path
        self.script: list[Action] = []  # run for each new subscriber
        self.reject: tuple[int, str] | None = None  # refuse the WebSocket handshake
        self.subscribers: list[Subscriber] = []
        self.subscribed = threading.Condition()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind(str(path))
        self._unix.listen(16)  # connections wait in the backlog until the loop runs
        self._tcp = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._tcp.getsockname()[1]}"
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._started.wait(TIMEOUT), "fake relayd did not start"

    # -- driven from the test thread

    def wait_subscribed(self, count: int = 1) -> Subscriber:
        with self.subscribed:
            ok = self.subscribed.wait_for(lambda: len(self.subscribers) >= count, TIMEOUT)
        assert ok, "no WebSocket subscriber"
        return self.subscribers[count - 1]

    def publish(self, port: int, data: bytes) -> None:
        self._run(self._publish(port, data))

    def stop(self, code: int | None = CloseCode.GOING_AWAY) -> None:
        """Close every subscriber with ``code`` (None: cut them off), then stop serving."""
        if self._loop is not None and self._thread.is_alive():
            self._run(self._shutdown(code))
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "fake relayd did not stop"

    def _run(self, coro: Any) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(TIMEOUT)

    # -- the server, on its own loop

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        unix = await asyncio.start_unix_server(self._connection, sock=self._unix)
        tcp = await asyncio.start_server(
            functools.partial(self._connection, via_tcp=True), sock=self._tcp
        )
        self._started.set()
        await self._stop.wait()
        unix.close()
        tcp.close()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _shutdown(self, code: int | None) -> None:
        for sub in self.subscribers:
            if code is None:
                sub.writer.transport.abort()
            elif sub.proto.state is State.OPEN:
                sub.proto.send_close(code)
                self._flush(sub.proto, sub.writer)
        assert self._stop is not None
        self._stop.set()

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, via_tcp: bool = False
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
            method, target, _ = request_line.split(" ")
            headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
            if headers.get("upgrade", "").lower() == "websocket":
                await self._websocket(head, target, headers, reader, writer)
                return
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, payload = self.state.answer(method, target, headers, body, via_tcp=via_tcp)
            text = json.dumps(payload).encode()
            writer.write(
                f"HTTP/1.1 {status} {httpx.codes.get_reason_phrase(status)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + text
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _websocket(
        self,
        head: bytes,
        target: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        proto = ServerProtocol(max_size=None)
        proto.receive_data(head)
        [request] = proto.events_received()
        assert isinstance(request, Request)
        if self.reject is not None:
            status, body = self.reject
            response = proto.reject(status, body)
        else:
            response = proto.accept(request)
        proto.send_response(response)
        self._flush(proto, writer)
        if proto.state is not State.OPEN:
            return
        query = parse_qs(urlsplit(target).query)
        ports = [int(p) for p in query.get("port", [])]
        sub = Subscriber(
            proto,
            writer,
            ports,
            query.get("format") == ["json"],
            headers.get("authorization"),
            query,
        )
        unknown = [p for p in ports if p not in self.state.ports]
        if unknown:
            proto.send_close(CloseCode.POLICY_VIOLATION, f"unknown port {unknown[0]}")
        else:
            with self.subscribed:
                self.subscribers.append(sub)
                self.subscribed.notify_all()
            for action in self.script:
                if action[0] == "send":
                    self._send(sub, action[1])
                elif action[0] == "close":
                    proto.send_close(action[1], action[2])
                else:
                    writer.transport.abort()
                    return
        self._flush(proto, writer)
        while still_open(proto):
            data = await reader.read(65536)
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            proto.events_received()  # pongs and the client's close: the protocol answers
            if not self._flush(proto, writer):
                break

    @staticmethod
    def _flush(proto: ServerProtocol, writer: asyncio.StreamWriter) -> bool:
        """Write what the protocol has to send; False once it wants the connection closed."""
        for data in proto.data_to_send():
            if not data:
                writer.close()
                return False
            writer.write(data)
        return not writer.is_closing()

    def _send(self, sub: Subscriber, data: str | bytes) -> None:
        if isinstance(data, str):
            sub.proto.send_text(data.encode())
        else:
            sub.proto.send_binary(data)
        self._flush(sub.proto, sub.writer)

    async def _publish(self, port: int, data: bytes) -> None:
        for sub in self.subscribers:
            if sub.proto.state is not State.OPEN or (sub.ports and port not in sub.ports):
                continue
            if sub.json:
                envelope = {"port": port, "name": None, "peer": "192.0.2.7:51234", "ts": "now"}
                envelope["data"] = data.decode()
                self._send(sub, json.dumps(envelope))
            else:
                try:
                    self._send(sub, data.decode())
                except UnicodeDecodeError:
                    self._send(sub, data)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit in a Unix socket address (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="relayctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeRelayd]:
    server = FakeRelayd(FakeState(token="s3cret"), short_dir / "admin.sock")
    yield server
    server.stop()


# --- running relayctl ----------------------------------------------------------


def invoke(
    args: list[str],
    transport: httpx.BaseTransport | None = None,
    env: Mapping[str, str | None] | None = None,
    input: bytes | None = None,
) -> Result:
    kwargs: dict[str, Any] = {}
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        kwargs["mix_stderr"] = False  # click 8.1 (typer 0.15); later ones keep them apart
    result = CliRunner(**kwargs).invoke(
        cli.app, args, input=input, obj=transport, env=NO_ENV | dict(env or {})
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def operator_env() -> dict[str, str]:
    """The environment minus RELAYCTL_* and PYTHONASYNCIODEBUG (`make pytest` sets it for
    relayd; in relayctl its slow-callback warnings land on stderr on a loaded machine)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYCTL_") and k != "PYTHONASYNCIODEBUG"
    }


def relayctl(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    clean = operator_env()
    return subprocess.run(
        [*prefix, str(RELAYCTL), *args],
        capture_output=True,
        text=True,
        env=clean | (env or {}),
        timeout=TIMEOUT,
        check=False,
    )


def relayctl_bg(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # With faulthandler on, a relayctl that does not exit shows where it is (finish).
    clean = operator_env() | {"PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(
        [str(RELAYCTL), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean | (env or {}),
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    if proc.stdout is not None and proc.stdout.closed:
        proc.stdout = None
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGABRT: faulthandler prints every thread's stack to stderr, then it dies.
        proc.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        pytest.fail(f"relayctl did not exit within {TIMEOUT} s; where it was:\n{err}")
    return proc.returncode, out or "", err or ""


def no_traceback(text: str) -> None:
    assert "Traceback" not in text


# --- formatting helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1234, "1.2 KiB"),
        (1048575, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (1024**6, "1024.0 PiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert cli_output.human_bytes(n) == text


@given(st.integers(min_value=1024, max_value=1024**5 - 1))
def test_human_bytes_keeps_the_number_below_1024(n: int) -> None:
    number, unit = cli_output.human_bytes(n).split()
    assert unit in ("KiB", "MiB", "GiB", "TiB", "PiB")
    assert 1.0 <= float(number) < 1024


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3723.5, "1h 2m"), (93784, "1d 2h"), (-3, "0s")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert cli_output.human_duration(seconds) == text


@given(st.binary())
def test_escape_bytes_is_one_printable_line_that_decodes_back(data: bytes) -> None:
    line = cli_output.escape_bytes(data)
    assert line.isascii() and line.isprintable()
    assert codecs.escape_decode(line.encode())[0] == data


@given(st.text())
def test_escape_text_leaves_no_control_character(text: str) -> None:
    line = cli_output.escape_text(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)
    if text.isprintable():
        assert line == text


def test_escapes() -> None:
    assert cli_output.escape_bytes(b"\x00ab\\\xff\r\n\t") == "\\x00ab\\\\\\xff\\r\\n\\t"
    assert cli_output.escape_text("\x1b[31mred\x1b[0m\ttab\n") == "\\x1b[31mred\\x1b[0m\\ttab\\n"
    assert cli_output.escape_text("café ✓ \\") == "café ✓ \\"


def test_table_aligns_columns() -> None:
    text = cli_output.table(["A", "LONG"], [["xyz", "1"], ["", "22"]], right={1})
    assert text.splitlines() == ["A    LONG", "xyz     1", "       22"]


@pytest.mark.parametrize(
    ("close", "code", "message"),
    [
        (None, 69, "lost the connection to relayd at /s"),
        (Close(1001, ""), 69, "relayd closed the connection (going away)"),
        (Close(1001, "relayd is stopping"), 69, "(going away: relayd is stopping)"),
        (Close(1012, ""), 69, "relayd closed the connection (service restart)"),
        (Close(4000, ""), 69, "relayd closed the connection (code 4000)"),
        (Close(1008, "unknown port 9"), 1, "unknown port 9"),
        (Close(1013, ""), 1, "relayd refused the subscription (code 1013)"),
    ],
)
def test_closed_message(close: Close | None, code: int, message: str) -> None:
    exc = ConnectionClosed(close, None)
    got_code, got_message = cli_transport.closed_message(cli_transport.Target(socket="/s"), exc)
    assert got_code == code
    assert message in got_message


# --- every command through a MockTransport ------------------------------------------


def test_version() -> None:
    result = invoke(["--version"])
    assert (result.exit_code, result.stdout) == (0, f"relayctl {__version__}\n")


HELP_LEVELS = ["", "status", "reload", "tail", "ports", "ports list", "ports show"]
HELP_LEVELS += ["ports add", "ports remove", "tokens", "tokens list", "tokens add"]
HELP_LEVELS += ["tokens remove", "send"]


@pytest.mark.parametrize("command", HELP_LEVELS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_on_every_level(command: str, flag: str) -> None:
    state = FakeState()
    result = invoke([*command.split(), flag], mock(state))
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: relayctl {command}".rstrip())
    assert state.seen == []


@pytest.mark.parametrize("args", [[], ["--socket", "/s"], ["ports"], ["tokens"]])
def test_no_command_is_a_usage_error_with_the_help(args: list[str]) -> None:
    state = FakeState()
    result = invoke(args, mock(state))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("Usage: relayctl")
    assert "Commands:" in result.stderr
    assert state.seen == []


def test_status() -> None:
    state = FakeState()
    result = invoke(["status"], mock(state))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:8] == [
        "state            ready",
        f"version          {__version__}",
        "pid              4242",
        "uptime           1h 2m",
        "http             127.0.0.1:8000",
        "ports            2",
        "tcp connections  2",
        "ws clients       1",
    ]
    assert lines[8] == ""
    assert lines[9].split() == list(cli_output.PORT_COLUMNS)
    assert [s.path for s in state.seen] == ["/v1/status", "/v1/ports"]


def test_status_shows_the_mqtt_uplink() -> None:
    body = {"state": "ready", "mqtt": {"state": "connecting", "spooled": 1200}}
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json=body if request.url.path == "/v1/status" else [])
    )
    result = invoke(["status"], transport)
    assert result.exit_code == 0, result.stderr
    assert "mqtt             connecting, 1200 spooled" in result.stdout.splitlines()


def test_status_json_prints_the_api_json_unchanged() -> None:
    body = b'{"version": "0.1.0",   "state": "draining"}'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    result = invoke(["status", "--json"], transport)
    assert (result.exit_code, result.stdout) == (0, body.decode() + "\n")


def test_ports_list_is_an_aligned_table() -> None:
    state = FakeState()
    result = invoke(["ports", "list"], mock(state))
    assert result.exit_code == 0
    header, first, second = result.stdout.splitlines()
    assert header.split() == list(cli_output.PORT_COLUMNS)
    assert first.split() == [
        "8001",
        "scale-1",
        "0.0.0.0",
        "lines",
        "64",
        "listening",
        "config",
        "2",
        "12",
        "1.2",
        "KiB",
    ]
    assert second.split() == [
        "8002",
        "-",
        "0.0.0.0",
        "raw",
        "8",
        "listening",
        "config",
        "0",
        "0",
        "0",
        "B",
    ]
    for column in ("NAME", "HOST", "FRAMING", "STATE", "SOURCE"):  # left-aligned
        at = header.index(column)
        assert first[at - 2 : at] == "  " and second[at - 2 : at] == "  "
    assert first.endswith("1.2 KiB") and second.endswith("  0 B")  # right-aligned
    at = header.index("MAXCONN") + len("MAXCONN")
    assert first[at - 3 : at] == " 64" and second[at - 2 : at] == " 8"
    assert len(first) == len(second) == len(header)


def test_status_without_ports() -> None:
    result = invoke(["status"], mock(FakeState(ports={})))
    assert result.exit_code == 0
    assert result.stdout.endswith("ports            0\ntcp connections  0\nws clients       1\n")


def test_ports_list_empty() -> None:
    state = FakeState(ports={})
    assert invoke(["ports", "list"], mock(state)).stdout == "no listener ports\n"


def test_ports_list_json() -> None:
    state = FakeState()
    result = invoke(["ports", "list", "--json"], mock(state))
    assert json.loads(result.stdout) == [state.ports[8001], state.ports[8002]]


def test_ports_show() -> None:
    result = invoke(["ports", "show", "8001"], mock(FakeState()))
    assert result.exit_code == 0
    assert "name             scale-1" in result.stdout
    assert "max connections  64" in result.stdout
    assert "bytes            1.2 KiB (1234)" in result.stdout
    assert json.loads(invoke(["ports", "show", "8001", "--json"], mock(FakeState())).stdout)


def test_ports_show_unknown_port_exits_1_with_the_detail() -> None:
    result = invoke(["ports", "show", "9999"], mock(FakeState()))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "relayctl: port 9999 is not a listener\n"


def test_ports_add_sends_only_the_given_fields() -> None:
    state = FakeState()
    result = invoke(["ports", "add", "8004"], mock(state))
    assert (result.exit_code, result.stdout) == (0, "port 8004 listening\n")
    assert state.seen[-1].body == {"port": 8004}


def test_ports_add_with_every_option() -> None:
    state = FakeState()
    args = ["ports", "add", "8004", "--name", "scale-9", "--host", "127.0.0.1"]
    result = invoke([*args, "--framing", "raw", "--max-connections", "5"], mock(state))
    assert (result.exit_code, result.stdout) == (0, "port 8004 listening (scale-9)\n")
    assert state.seen[-1].method == "POST"
    assert state.seen[-1].body == {
        "port": 8004,
        "host": "127.0.0.1",
        "name": "scale-9",
        "framing": "raw",
        "max_connections": 5,
    }
    assert state.ports[8004]["framing"] == "raw"


def test_ports_add_json() -> None:
    result = invoke(["ports", "add", "8004", "--json"], mock(FakeState()))
    assert json.loads(result.stdout)["port"] == 8004


@pytest.mark.parametrize(
    ("port", "detail"),
    [(8001, "port 8001 is already a listener"), (8005, "port 8005: address already in use")],
)
def test_ports_add_conflict_exits_1_with_the_detail(port: int, detail: str) -> None:
    result = invoke(["ports", "add", str(port)], mock(FakeState(busy={8005})))
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"relayctl: {detail}\n")


def test_a_validation_error_list_becomes_one_line() -> None:
    body = {"detail": [{"loc": ["body", "host"], "msg": "bad\nhost"}, {"msg": "and more"}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(422, json=body))
    result = invoke(["ports", "add", "8004", "--host", "x y"], transport)
    assert (result.exit_code, result.stderr) == (1, "relayctl: bad host; and more\n")


@pytest.mark.parametrize(
    "args",
    [
        ["ports", "add", "0"],
        ["ports", "add", "65536"],
        ["ports", "add", "--", "-1"],
        ["ports", "add", "abc"],
        ["ports", "add"],
        ["ports", "add", "8004", "--framing", "json"],
        ["ports", "add", "8004", "--max-connections", "0"],
        ["ports", "show", "70000"],
        ["ports", "remove", "0"],
        ["tail", "--port", "0"],
        ["tail", "--port", "8001", "-p", "65536"],
        ["send", "0", "T"],
        ["send", "8001"],
        ["send", "8001", "T", "--file", "-"],
        ["send", "8001", "--peer", "192.0.2.7:51234"],
        ["send", "8001", "--file", "/nonexistent/command"],
        ["ports", "frobnicate"],
        ["status", "--bogus"],
        ["--url", "ftp://host", "status"],
        ["--url", "http://", "status"],
        ["--url", "http://[::1", "status"],
        ["--socket", "/s", "--url", "http://h:1", "status"],
    ],
)
def test_usage_errors_exit_2_before_any_request(args: list[str]) -> None:
    state = FakeState()
    result = invoke(args, mock(state))
    assert result.exit_code == 2, result.stdout
    assert "Usage: relayctl" in result.stderr
    assert state.seen == []


def test_both_socket_and_url_in_the_environment_is_a_usage_error() -> None:
    env = {"RELAYCTL_SOCKET": "/s", "RELAYCTL_URL": "http://h:1"}
    result = invoke(["status"], mock(FakeState()), env)
    assert result.exit_code == 2
    assert "RELAYCTL_SOCKET / RELAYCTL_URL" in result.stderr


def test_ports_remove_prints_the_final_counters() -> None:
    state = FakeState()
    result = invoke(["ports", "remove", "8001"], mock(state))
    assert result.exit_code == 0
    assert result.stdout == "port 8001 (scale-1) removed: 12 messages, 1.2 KiB received\n"
    assert (state.seen[-1].method, state.seen[-1].path) == ("DELETE", "/v1/ports/8001")
    assert state.seen[-1].query == {}
    assert 8001 not in state.ports


@pytest.mark.parametrize(
    ("drain_timeout", "limit"), [(5.0, "5 s"), (2.5, "2.5 s"), (0, "0 s"), (None, "drain.timeout")]
)
def test_ports_remove_says_first_that_the_port_drains_and_for_how_long(
    drain_timeout: float | None, limit: str
) -> None:
    state = FakeState(drain_timeout=drain_timeout)
    result = invoke(["ports", "remove", "8001"], mock(state))
    assert result.exit_code == 0
    assert result.stderr == (
        f"relayctl: port 8001 (scale-1) is draining: devices still connected get up to {limit}"
        " to close\n"
    )
    # Said before the DELETE, which waits for the drain.
    assert [(s.method, s.path) for s in state.seen] == [
        ("GET", "/v1/ports/8001"),
        ("GET", "/v1/status"),
        ("DELETE", "/v1/ports/8001"),
    ]


def test_ports_remove_force_and_json() -> None:
    state = FakeState()
    result = invoke(["ports", "remove", "8002", "--force"], mock(state))
    assert (result.exit_code, result.stderr) == (0, "")  # no drain, nothing to wait for
    assert [s.method for s in state.seen] == ["DELETE"]
    result = invoke(["ports", "remove", "8001", "--json"], mock(FakeState()))
    assert result.stderr.startswith("relayctl: port 8001 (scale-1) is draining: ")
    assert json.loads(result.stdout)["port"] == 8001  # stdout is the JSON alone


def test_ports_remove_force() -> None:
    state = FakeState()
    result = invoke(["ports", "remove", "8002", "--force"], mock(state))
    assert (result.exit_code, result.stdout) == (0, "port 8002 removed: 0 messages, 0 B received\n")
    assert state.seen[-1].query == {"force": ["true"]}


def test_ports_remove_json_and_unknown() -> None:
    assert json.loads(invoke(["ports", "remove", "8001", "--json"], mock(FakeState())).stdout)
    result = invoke(["ports", "remove", "9999"], mock(FakeState()))
    assert (result.exit_code, result.stderr) == (1, "relayctl: port 9999 is not a listener\n")


@pytest.mark.parametrize(
    ("outcome", "code", "stdout", "stderr"),
    [
        ({}, 0, "reloaded: no changes\n", ""),
        (
            {"added": [8004, 8005], "removed": [8003], "changed": [8001]},
            0,
            "reloaded: added 8004, 8005; removed 8003; changed 8001\n",
            "",
        ),
        (
            {"added": [8004], "failed": [{"port": 8006, "detail": "address already in use"}]},
            1,
            "reloaded: added 8004\n",
            "relayctl: port 8006: address already in use\n",
        ),
        (
            {"failed": [{"port": 8006, "detail": "port 8006: permission denied"}]},
            1,
            "reloaded: no changes\n",
            "relayctl: port 8006: permission denied\n",
        ),
    ],
)
def test_reload(outcome: dict[str, Any], code: int, stdout: str, stderr: str) -> None:
    result_body = {"added": [], "removed": [], "changed": [], "failed": []} | outcome
    state = FakeState(reload_result=result_body)
    result = invoke(["reload"], mock(state))
    assert (result.exit_code, result.stdout, result.stderr) == (code, stdout, stderr)
    assert (state.seen[-1].method, state.seen[-1].path) == ("POST", "/v1/reload")


def test_reload_json_and_invalid_config() -> None:
    state = FakeState()
    assert json.loads(invoke(["reload", "--json"], mock(state)).stdout) == state.reload_result
    state.reload_error = "relayd.toml: ports[1].port: 70000 is not a port"
    result = invoke(["reload"], mock(state))
    assert (result.exit_code, result.stderr) == (1, f"relayctl: {state.reload_error}\n")


def test_over_the_socket_the_host_is_relayd_and_no_token_is_sent() -> None:
    state = FakeState()
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return mock(state).handle_request(request)

    result = invoke(["--token", "t", "ports", "list"], httpx.MockTransport(handle))
    assert result.exit_code == 0
    assert str(seen[0].url) == "http://relayd/v1/ports"
    assert "authorization" not in seen[0].headers
    assert seen[0].headers["user-agent"] == f"relayctl/{__version__}"


@pytest.mark.parametrize("how", ["options", "environment"])
def test_url_and_token(how: str) -> None:
    state = FakeState(token="s3cret")
    if how == "options":
        args, env = ["--url", "http://gw:8000/", "--token", "s3cret", "ports", "list"], {}
    else:
        args, env = (
            ["ports", "list"],
            {"RELAYCTL_URL": "http://gw:8000", "RELAYCTL_TOKEN": "s3cret"},
        )
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return mock(state, via_tcp=True).handle_request(request)

    result = invoke(args, httpx.MockTransport(handle), env)
    assert result.exit_code == 0, result.stderr
    assert str(seen[0].url) == "http://gw:8000/v1/ports"
    assert seen[0].headers["authorization"] == "Bearer s3cret"


def test_socket_on_the_command_line_beats_relayctl_url() -> None:
    result = invoke(
        ["--socket", "/nonexistent/relayd.sock", "status"], env={"RELAYCTL_URL": "http://h"}
    )
    assert result.exit_code == 69
    assert "cannot reach relayd at /nonexistent/relayd.sock" in result.stderr


def test_url_on_the_command_line_beats_relayctl_socket() -> None:
    state = FakeState(token="t")
    env = {"RELAYCTL_SOCKET": "/nonexistent.sock", "RELAYCTL_TOKEN": "t"}
    result = invoke(["--url", "http://gw:8000", "status"], mock(state, via_tcp=True), env)
    assert result.exit_code == 0


def test_bad_token_exits_1_with_the_detail() -> None:
    state = FakeState(token="s3cret")
    args = ["--url", "http://gw:8000", "--token", "wrong", "status"]
    result = invoke(args, mock(state, via_tcp=True))
    assert (result.exit_code, result.stderr) == (1, "relayctl: missing or invalid bearer token\n")


def test_url_without_the_admin_api_says_why() -> None:
    state = FakeState(token=None)
    result = invoke(["--url", "http://gw:8000", "status"], mock(state, via_tcp=True))
    assert result.exit_code == 1
    assert "does not serve the admin API; is admin.token_file set?" in result.stderr


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(500, text="boom"), "relayctl: HTTP 500 Internal Server Error\n"),
        (httpx.Response(503, json={"detail": ""}), "relayctl: HTTP 503 Service Unavailable\n"),
        (httpx.Response(200, text="<html>"), "relayctl: unexpected answer from relayd at "),
        (httpx.Response(200, json=[1]), "relayctl: unexpected answer from relayd at "),
    ],
)
def test_odd_answers_exit_1(response: httpx.Response, message: str) -> None:
    result = invoke(["status"], httpx.MockTransport(lambda request: response))
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_odd_port_lists_exit_1() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"ports": []}))
    result = invoke(["ports", "list"], transport)
    assert result.exit_code == 1
    assert "not a list of ports" in result.stderr


def raising(exc: BaseException) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handle)


def connect_error(os_error: OSError) -> httpx.ConnectError:
    try:
        raise httpx.ConnectError(str(os_error)) from os_error
    except httpx.ConnectError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            connect_error(FileNotFoundError(2, "No such file or directory")),
            "No such file or directory (is relayd running?)",
        ),
        (
            connect_error(ConnectionRefusedError(111, "Connection refused")),
            "Connection refused (is relayd running?)",
        ),
        (
            connect_error(PermissionError(13, "Permission denied")),
            "Permission denied (are you in the relayd group?)",
        ),
        (
            PermissionError(1, "Operation not permitted"),
            "Operation not permitted (are you in the relayd group?)",
        ),
        (httpx.ReadTimeout("read timed out"), "timed out (is relayd running?)"),
        (httpx.RemoteProtocolError("Server disconnected"), "Server disconnected (is relayd"),
    ],
)
def test_unreachable_exits_69_with_a_hint(exc: Exception, reason: str) -> None:
    result = invoke(["--socket", "/run/x.sock", "ports", "list"], raising(exc))
    assert result.exit_code == 69
    assert result.stderr.startswith(f"relayctl: cannot reach relayd at /run/x.sock: {reason}")
    assert result.stderr.count("\n") == 1


def test_unreachable_names_the_url() -> None:
    args = ["--url", "http://gw:8000", "status"]
    result = invoke(args, raising(connect_error(ConnectionRefusedError(111, "Connection refused"))))
    assert result.exit_code == 69
    assert result.stderr == (
        "relayctl: cannot reach relayd at http://gw:8000: Connection refused (is relayd running?)\n"
    )


def test_relayctl_socket_sets_the_socket(short_dir: Path) -> None:
    path = str(short_dir / "missing.sock")
    result = invoke(["status"], env={"RELAYCTL_SOCKET": path})
    assert result.exit_code == 69
    assert result.stderr == (
        f"relayctl: cannot reach relayd at {path}: No such file or directory (is relayd running?)\n"
    )


def test_ctrl_c_exits_130() -> None:
    result = invoke(["ports", "remove", "8001"], raising(KeyboardInterrupt()))
    assert result.exit_code == 130


# --- main(): the console script's own handling -----------------------------------


def test_main_exit_codes(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"relayctl {__version__}\n"
    assert cli.main(["ports", "add", "0"]) == 2
    assert "0 is not a port number (1-65535)" in capsys.readouterr().err
    assert cli.main(["--socket", str(short_dir / "none.sock"), "status"]) == 69
    assert "(is relayd running?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("exc", "code", "stderr"),
    [
        (KeyboardInterrupt(), 130, ""),
        (RuntimeError("boom"), 1, "relayctl: unexpected error: RuntimeError: boom\n"),
    ],
)
def test_main_never_shows_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    code: int,
    stderr: str,
) -> None:
    def broken(self: cli_transport.UnixHTTPConnection) -> None:
        raise exc

    monkeypatch.setattr(cli_transport.UnixHTTPConnection, "connect", broken)
    assert cli.main(["status"]) == code
    captured = capsys.readouterr()
    assert captured.err == stderr


# --- tail, in process, against the fake daemon -------------------------------------


def test_tail_prints_messages_escaped_until_relayd_goes_away(fake: FakeRelayd) -> None:
    fake.script = [
        ("send", "weight 12.5 kg"),
        ("send", "bell\x07 and\nnewline"),
        ("send", b"\x02\xff\x00raw"),
        ("close", CloseCode.GOING_AWAY, ""),
    ]
    result = invoke(["--socket", str(fake.path), "tail", "--port", "8001", "-p", "8002"])
    assert result.stdout == "weight 12.5 kg\nbell\\x07 and\\nnewline\n\\x02\\xff\\x00raw\n"
    assert (result.exit_code, result.stderr) == (
        69,
        "relayctl: relayd closed the connection (going away)\n",
    )
    assert fake.subscribers[0].ports == [8001, 8002]
    assert not fake.subscribers[0].json


def test_tail_json(fake: FakeRelayd) -> None:
    envelope = json.dumps({"port": 8001, "data_b64": "AP8="})
    fake.script = [("send", envelope), ("close", CloseCode.GOING_AWAY, "stopping")]
    result = invoke(["--socket", str(fake.path), "tail", "--json"])
    assert result.stdout == envelope + "\n"
    assert result.stderr == "relayctl: relayd closed the connection (going away: stopping)\n"
    assert fake.subscribers[0].json and fake.subscribers[0].ports == []


def test_tail_last_asks_for_the_kept_messages(fake: FakeRelayd) -> None:
    fake.script = [("send", "kept"), ("close", CloseCode.GOING_AWAY, "")]
    result = invoke(["--socket", str(fake.path), "tail", "--last", "5", "-p", "8001"])
    assert result.stdout == "kept\n"
    assert fake.subscribers[0].query == {"port": ["8001"], "last": ["5"]}
    fake.script = [("close", CloseCode.GOING_AWAY, "")]
    invoke(["--socket", str(fake.path), "tail"])
    assert "last" not in fake.subscribers[1].query


@pytest.mark.parametrize("value", ["-1", "ten", "1000001"])
def test_tail_last_must_be_a_count(fake: FakeRelayd, value: str) -> None:
    result = invoke(["--socket", str(fake.path), "tail", "--last", value])
    assert result.exit_code == 2
    assert "--last" in result.stderr
    assert fake.subscribers == []


def test_tail_unknown_port_exits_1_with_the_reason(fake: FakeRelayd) -> None:
    result = invoke(["--socket", str(fake.path), "tail", "--port", "9999"])
    assert (result.exit_code, result.stderr) == (1, "relayctl: unknown port 9999\n")


def test_tail_too_many_clients_exits_1(fake: FakeRelayd) -> None:
    fake.script = [("close", CloseCode.TRY_AGAIN_LATER, "too many clients (1000)")]
    result = invoke(["--socket", str(fake.path), "tail"])
    assert (result.exit_code, result.stderr) == (1, "relayctl: too many clients (1000)\n")


def test_tail_lost_connection_exits_69(fake: FakeRelayd) -> None:
    fake.script = [("send", "one"), ("drop",)]
    result = invoke(["--socket", str(fake.path), "tail"])
    assert result.exit_code == 69
    assert result.stderr == f"relayctl: lost the connection to relayd at {fake.path}\n"


def test_tail_handshake_refused_exits_1_with_the_detail(fake: FakeRelayd) -> None:
    fake.reject = (503, json.dumps({"detail": "relayd is starting"}))
    result = invoke(["--socket", str(fake.path), "tail"])
    assert (result.exit_code, result.stderr) == (1, "relayctl: relayd is starting\n")


def test_tail_over_url_sends_the_token(fake: FakeRelayd) -> None:
    fake.script = [("send", "hi"), ("close", CloseCode.GOING_AWAY, "")]
    result = invoke(["--url", fake.url + "/", "--token", "s3cret", "tail", "-p", "8001"])
    assert (result.exit_code, result.stdout) == (69, "hi\n")
    assert fake.subscribers[0].authorization == "Bearer s3cret"
    assert fake.subscribers[0].ports == [8001]


def test_tail_without_a_daemon_exits_69(short_dir: Path) -> None:
    path = short_dir / "none.sock"
    result = invoke(["--socket", str(path), "tail"])
    assert result.exit_code == 69
    assert result.stderr == (
        f"relayctl: cannot reach relayd at {path}: No such file or directory (is relayd running?)\n"
    )


def test_tail_url_without_a_daemon_exits_69() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = invoke(["--url", url, "tail"])
    assert result.exit_code == 69
    assert result.stderr == (
        f"relayctl: cannot reach relayd at {url}: Connection refused (is relayd running?)\n"
    )


# --- the installed relayctl against the fake daemon ------------------------------


# The console script end to end, one case per exit code and output kind (every command
# runs against the real relayd in test_cli_daemon.py, mostly in process). Each case has a fake
# of its own, and they run at once: a run is mostly the interpreter starting.
INSTALLED_CASES: list[tuple[list[str], int, str, str]] = [
    (["status"], 0, "state            ready\n", ""),
    (["ports", "list", "--json"], 0, '[{"port": 8001, ', ""),
    (["ports", "show", "8009"], 1, "", "relayctl: port 8009 is not a listener\n"),
    (
        ["ports", "remove", "8001"],
        0,
        "port 8001 (scale-1) removed: 12 messages",
        "relayctl: port 8001 (scale-1) is draining: ",
    ),
    (["ports", "add", "65536"], 2, "", "Error: Invalid value for"),
]  # no command at all (exit 2, usage): test_cli_daemon.py runs it installed


def test_installed_relayctl(short_dir: Path) -> None:
    fakes = [
        FakeRelayd(FakeState(token="s3cret"), short_dir / f"admin-{i}.sock")
        for i in range(len(INSTALLED_CASES))
    ]
    try:
        runs = [
            relayctl_bg(*args, env={"RELAYCTL_SOCKET": str(fake.path)})
            for (args, *_), fake in zip(INSTALLED_CASES, fakes, strict=True)
        ]
        results = [finish(proc) for proc in runs]
    finally:
        for fake in fakes:
            fake.stop()
    for (args, code, stdout, stderr), (got, out, err) in zip(INSTALLED_CASES, results, strict=True):
        assert got == code, (args, err)
        assert stdout in out if stdout else out == "", args
        assert stderr in err if stderr else err == "", args
        no_traceback(err)


def test_installed_relayctl_over_url(fake: FakeRelayd) -> None:
    # A wrong token (exit 1) is checked in process; a refusal runs installed above.
    ok = relayctl("--url", fake.url, "--token", "s3cret", "ports", "add", "8004")
    assert (ok.returncode, ok.stdout) == (0, "port 8004 listening\n")


def test_installed_relayctl_without_a_daemon(short_dir: Path) -> None:
    missing = relayctl("--socket", str(short_dir / "admin.sock"), "status")
    assert missing.returncode == 69
    assert missing.stderr == (
        f"relayctl: cannot reach relayd at {short_dir / 'admin.sock'}:"
        " No such file or directory (is relayd running?)\n"
    )
    # A stale socket (Connection refused) is checked in process in test_cli_daemon.py.


# A socket whose file mode refuses relayctl (exit 69, the group hint, status and tail):
# test_cli_daemon.py runs the installed relayctl so, under setpriv as root.


def test_installed_tail_ends_when_relayd_stops(fake: FakeRelayd) -> None:
    proc = relayctl_bg("--socket", str(fake.path), "tail", "--port", "8001")
    try:
        fake.wait_subscribed()
        fake.publish(8002, b"not subscribed")
        fake.publish(8001, b"weight 12.5 kg")
        fake.publish(8001, b"\x1b[2J\xff\x00")
        fake.stop(CloseCode.GOING_AWAY)
    finally:
        code, out, err = finish(proc)
    assert out == "weight 12.5 kg\n\\x1b[2J\\xff\\x00\n"
    assert (code, err) == (69, "relayctl: relayd closed the connection (going away)\n")


def test_installed_tail_ends_when_the_connection_is_lost(fake: FakeRelayd) -> None:
    proc = relayctl_bg("--socket", str(fake.path), "tail")
    try:
        fake.wait_subscribed()
        fake.stop(None)
    finally:
        code, out, err = finish(proc)
    assert (code, out) == (69, "")
    assert err == f"relayctl: lost the connection to relayd at {fake.path}\n"


def test_installed_tail_into_a_closed_pipe_exits_0(fake: FakeRelayd) -> None:
    proc = relayctl_bg("--socket", str(fake.path), "tail")
    try:
        fake.wait_subscribed()
        assert proc.stdout is not None
        proc.stdout.close()  # like `relayctl tail | head -1` once head has its line
        fake.publish(8001, b"one")
        fake.publish(8001, b"two")
    finally:
        code, _, err = finish(proc)
    assert (code, err) == (0, "")


def test_installed_tail_ctrl_c_exits_130(fake: FakeRelayd) -> None:
    proc = relayctl_bg("--socket", str(fake.path), "tail", "--json")
    try:
        fake.wait_subscribed()
        fake.publish(8001, b"hello")
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], TIMEOUT)[0], "tail printed nothing"
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
    finally:
        code, out, err = finish(proc)
    assert (code, out) == (130, "")
    assert json.loads(first)["data"] == "hello"
    no_traceback(err)


class OnATerminal:
    """The installed relayctl with stdout and stderr on a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.primary, secondary = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "RELAYCTL_SOCKET")}
        self.proc = subprocess.Popen(
            [str(RELAYCTL), *args], stdout=secondary, stderr=secondary, env=env | {"TERM": "xterm"}
        )
        os.close(secondary)

    def output(self) -> str:
        chunks = []
        try:
            while select.select([self.primary], [], [], TIMEOUT)[0]:
                try:
                    chunk = os.read(self.primary, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            self.proc.wait(TIMEOUT)
        finally:
            os.close(self.primary)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return b"".join(chunks).decode()


def test_no_colour_even_on_a_terminal(fake: FakeRelayd) -> None:
    # A table, a usage error and help (what typer and rich would colour); status and a
    # refusal print through the same paths.
    cases = [
        ["ports", "list"],
        ["ports", "add", "0"],
        ["ports", "-h"],
    ]
    runs = [OnATerminal("--socket", str(fake.path), *args) for args in cases]  # all at once
    for args, run in zip(cases, runs, strict=True):
        text = run.output()
        assert text.strip(), args
        assert "\x1b" not in text, args


def test_a_detail_with_escape_sequences_reaches_a_terminal_escaped(fake: FakeRelayd) -> None:
    # relayd's detail can quote what an operator or a device chose (a name, a config
    # value): on a terminal it must not clear the screen or recolour it.
    fake.state.reload_error = "relayd.toml: name \x1b[2J\x1b[31mred\x07 is bad"
    text = OnATerminal("--socket", str(fake.path), "reload").output()
    assert "\x1b" not in text and "\x07" not in text
    assert text.strip() == "relayctl: relayd.toml: name \\x1b[2J\\x1b[31mred\\x07 is bad"


def test_installed_relayctl_completion() -> None:
    # typer detects the shell from the parent process: run it from a bash that does not
    # exec it away (under make, the parent would otherwise be sh, which typer does not know).
    proc = subprocess.run(
        ["bash", "-c", '"$0" --show-completion; exit $?', str(RELAYCTL)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "_RELAYCTL_COMPLETE" in proc.stdout


@pytest.mark.parametrize(
    ("args", "body"),
    [
        (["--connect", "192.0.2.40:4001"], {"connect": "192.0.2.40:4001"}),
        (
            ["--serial", "/dev/ttyUSB0", "--baudrate", "9600", "--parity", "even"],
            {"serial": "/dev/ttyUSB0", "baudrate": 9600, "parity": "even"},
        ),
        (["--bytesize", "7", "--stopbits", "2"], {"bytesize": 7, "stopbits": 2}),
        (
            ["--framing", "length", "--length-prefix", "u16le"],
            {"framing": "length", "length_prefix": "u16le"},
        ),
        (["--framing", "fixed", "--size", "12"], {"framing": "fixed", "size": 12}),
        (
            ["--framing", "delimiter", "--delimiter", "\x03"],
            {"framing": "delimiter", "delimiter": "\x03"},
        ),
    ],
)
def test_ports_add_sources_and_framings(args: list[str], body: dict[str, Any]) -> None:
    state = FakeState()
    result = invoke(["ports", "add", "8101", *args], mock(state))
    assert result.exit_code == 0, result.stderr
    assert state.seen[-1].body == {"port": 8101, **body}


def test_ports_add_refuses_a_bad_parity() -> None:
    result = invoke(["ports", "add", "8101", "--parity", "mark"], mock(FakeState()))
    assert result.exit_code == 2
