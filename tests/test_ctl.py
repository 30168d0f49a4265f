"""relayctl's quick path (relayd.ctl): the same output, errors and exit codes as typer.

``status``, ``ports list`` and ``ports show PORT`` run without typer when the
command line is one of their plain forms; everything else goes to the typer app.
Each form runs both ways against one fake admin socket (a real Unix socket with
canned answers) and must print the same bytes and exit with the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingUnixStreamServer
from typing import Any

import pytest

from relayd import cli, cli_output, ctl

from .helpers import MS

PORTS = [
    {
        "port": 8001,
        "name": "scale-1",
        "host": "0.0.0.0",
        "framing": "lines",
        "max_connections": 64,
        "state": "listening",
        "source": "config",
        "connections": 2,
        "messages_received": 12,
        "bytes_received": 1234,
    },
    {"port": 8002, "name": "café ✓", "host": "::", "framing": "raw", "connections": 0},
]
STATUS = {
    "state": "ready",
    "version": "0.1.0",
    "pid": 4242,
    "uptime_s": 3723.5,
    "http": "127.0.0.1:8000",
    "ports": 2,
    "tcp_connections": 2,
    "ws_clients": 1,
    "mqtt": {"state": "connected", "spooled": 3},
}
NOT_FOUND = {"detail": "port 9999 is not a listener"}

# path -> (status, body) of each answer set
ANSWERS: dict[str, dict[str, tuple[int, bytes]]] = {
    "normal": {
        "/v1/status": (200, json.dumps(STATUS).encode()),
        "/v1/ports": (200, json.dumps(PORTS).encode()),
        "/v1/ports/8001": (200, json.dumps(PORTS[0]).encode()),
        "/v1/ports/8002": (200, json.dumps(PORTS[1], ensure_ascii=False).encode()),
    },
    "empty": {
        "/v1/status": (200, b'{"state": "draining",   "ports": 0}'),
        "/v1/ports": (200, b"[]"),
    },
    "odd": {  # an escape sequence in a detail (click strips it off a terminal), not JSON
        "/v1/status": (503, b'{"detail": "\\u001b[31mred\\u001b[0m alert"}'),
        "/v1/ports": (200, b"<html>"),
        "/v1/ports/8001": (200, b"[1]"),
    },
}


class Handler(BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = self.answers.get(self.path, (404, json.dumps(NOT_FOUND).encode()))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class Server(ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("relayd", 0)  # BaseHTTPRequestHandler wants a (host, port)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relayctl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(path: Path, answers: dict[str, tuple[int, bytes]]) -> Iterator[Path]:
    handler = type("CannedHandler", (Handler,), {"answers": answers})
    with Server(str(path), handler) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield path
        finally:
            server.shutdown()
            thread.join(10_000 * MS)


@pytest.fixture(params=sorted(ANSWERS))
def admin(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Path]:
    """The admin socket with each answer set in turn."""
    with serving(short_dir / "admin.sock", ANSWERS[request.param]) as path:
        yield path


@pytest.fixture
def normal_admin(short_dir: Path) -> Iterator[Path]:
    with serving(short_dir / "admin.sock", ANSWERS["normal"]) as path:
        yield path


QUICK = [
    ["status"],
    ["status", "--json"],
    ["ports", "list"],
    ["ports", "list", "--json"],
    ["ports", "show", "8001"],
    ["ports", "show", "8002", "--json"],
    ["ports", "show", "--json", "8001"],
    ["ports", "show", "9999"],
    ["ports", "show", "65535"],
]

# Forms the quick path leaves to typer: help, usage errors, other spellings.
TYPER = [
    [],
    ["--help"],
    ["status", "-h"],
    ["--json", "status"],
    ["status", "--json", "--json"],
    ["status", "extra"],
    ["ports"],
    ["ports", "--json", "list"],
    ["ports", "show"],
    ["ports", "show", "0"],
    ["ports", "show", "65536"],
    ["ports", "show", "08001"],
    ["ports", "show", "+8001"],
    ["ports", "show", "8001", "8002"],
    ["ports", "add", "8004"],
    ["status", "--socket", "/x"],
    ["--socket"],
    ["--socket", "--json", "status"],
    ["--socket=", "status"],
    ["--url", "http://gw:8000", "status"],
    ["--version"],
    ["tokens", "list"],
]


def _run(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, ...]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("form", QUICK, ids=" ".join)
@pytest.mark.parametrize("via", ["option", "equals", "environment"])
def test_quick_forms_answer_as_typer_does(
    form: list[str],
    via: str,
    admin: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("RELAYCTL_SOCKET", "RELAYCTL_URL", "RELAYCTL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if via == "environment":
        monkeypatch.setenv("RELAYCTL_SOCKET", str(admin))
        argv = form
    else:
        argv = [f"--socket={admin}"] if via == "equals" else ["--socket", str(admin)]
        argv += form
    assert ctl.quick_command(argv) is not None
    typer_said = _run(cli.main, argv, capsys)
    assert _run(ctl.main, argv, capsys) == typer_said
    assert typer_said[0] in (0, 1)


@pytest.mark.parametrize("form", TYPER, ids=lambda f: " ".join(f) or "(none)")
def test_other_forms_go_to_typer(form: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAYCTL_URL", raising=False)
    monkeypatch.setenv("RELAYCTL_SOCKET", "/run/x.sock")
    assert ctl.quick_command(form) is None


@pytest.mark.parametrize(
    "env", [{"RELAYCTL_URL": "http://gw:8000"}, {"RELAYCTL_SOCKET": ""}, {"_RELAYCTL_COMPLETE": ""}]
)
def test_an_environment_the_quick_path_does_not_know_goes_to_typer(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ctl.quick_command(["status"]) is None


def test_unreachable_socket_exits_69_as_typer_does(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--socket", str(short_dir / "none.sock"), "status"]
    typer_said = _run(cli.main, argv, capsys)
    assert typer_said[0] == 69
    assert _run(ctl.main, argv, capsys) == typer_said


def test_a_bug_is_one_line_with_exit_1(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("relayd.cli_status.call", broken)
    argv = ["--socket", str(short_dir / "x.sock"), "status"]
    assert _run(ctl.main, argv, capsys) == (
        1,
        "",
        "relayctl: unexpected error: RuntimeError: boom\n",
    )


# The installed script, as an operator runs it: no typer, no pydantic, no rich.
PROBE = """
import json, sys
from relayd.ctl import main
code = main(sys.argv[1:])
heavy = ("typer", "click", "rich", "pydantic", "httpx", "websockets", "relayd.config")
sys.stderr.write(json.dumps([m for m in heavy if m in sys.modules]) + "\\n")
sys.exit(code)
"""
TYPER_MAIN = "import sys; from relayd.cli import main; sys.exit(main())"


def _process(*argv: str, script: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYCTL_", "PYTHONASYNCIO"))}
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=30_000 * MS,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "form", [["status"], ["ports", "show", "8002", "--json"], ["ports", "show", "9999"]]
)
def test_relayctl_process_imports_no_typer_and_prints_what_typer_prints(
    form: list[str], normal_admin: Path
) -> None:
    argv = ["--socket", str(normal_admin), *form]
    code, out, err = _process(*argv, script=PROBE)
    *messages, loaded = err.splitlines()
    assert json.loads(loaded) == []
    assert (code, out, "".join(m + "\n" for m in messages)) == _process(*argv, script=TYPER_MAIN)


def test_relayctl_into_a_closed_pipe_exits_1_quietly(normal_admin: Path) -> None:
    """`relayctl ports list | true`: exit 1 and nothing on stderr, as with typer."""
    argv = ["--socket", str(normal_admin), "ports", "list"]
    results = []
    for script in (PROBE, TYPER_MAIN):
        read, write = os.pipe()
        os.close(read)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYCTL_")}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", script, *argv],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=30_000 * MS,
                check=False,
            )
        finally:
            os.close(write)
        results.append((proc.returncode, proc.stderr))
    assert results == [(1, "[]\n"), (1, "")]


@pytest.mark.parametrize(
    "message", ["plain", "", "café ✓", "\x1b[31mred\x1b[0m", '{"a": 1}\n', "tab\there"]
)
@pytest.mark.parametrize(("err", "nl"), [(False, True), (True, True), (False, False)])
def test_echo_prints_what_typer_echo_prints(
    message: str, err: bool, nl: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both paths print through cli_output.echo: it must match typer.echo (off a terminal)."""
    import typer

    typer.echo(message, err=err, nl=nl)
    expected = capsys.readouterr()
    cli_output.echo(message, err=err, nl=nl)
    assert capsys.readouterr() == expected
