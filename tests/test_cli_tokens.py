"""relayctl tokens list|add|remove (relayctl(1), TOKENS), against tests/test_cli.py's fakes.

Through a MockTransport: what is sent, what is printed, which exit code. Then
the installed console script against FakeRelayd's real socket, as an operator
uses it: ``TOKEN=$(relayctl tokens add dashboard --read all)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relayd import __version__, cli_output
from tests.test_cli import (
    RELAYCTL,
    TIMEOUT,
    FakeRelayd,
    FakeState,
    finish,
    invoke,
    mock,
    no_traceback,
    relayctl_bg,
    token_object,
)

pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.fixture
def fake() -> Iterator[FakeRelayd]:
    path = Path(tempfile.mkdtemp(prefix="relayctl-"))  # short: a Unix socket path
    server = FakeRelayd(FakeState(token="s3cret"), path / "admin.sock")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(path, ignore_errors=True)


# --- tokens list ---------------------------------------------------------------------


def test_list_is_a_table_with_all_and_dashes() -> None:
    state = FakeState()
    result = invoke(["tokens", "list"], mock(state))
    assert (result.exit_code, result.stderr) == (0, "")
    header, dash, scales = result.stdout.splitlines()
    assert header.startswith("NAME    READ       WRITE  CREATED")
    assert header.endswith("EXPIRES               LAST USED")
    assert dash.split() == ["dash", "all", "-", "2026-11-30T09:00:00Z", "-", "-"]
    assert scales.split() == [
        "scales",
        "8001,8002",
        "8001",
        "2026-11-30T09:00:00Z",
        "2026-12-30T09:00:00Z",
        "2026-12-01T10:11:12Z",
    ]
    for column in cli_output.TOKEN_COLUMNS[1:]:  # left-aligned, each under its header
        at = header.index(column)
        assert dash[at - 2 : at] == "  " and scales[at - 2 : at] == "  "
        assert dash[at] != " " and scales[at] != " "
    assert [(s.method, s.path) for s in state.seen] == [("GET", "/v1/tokens")]


def test_list_shows_odd_values_escaped_never_raw() -> None:
    odd = token_object("x\x1b[2J", read=[0, "a"], write="everything", created=None)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[odd]))
    result = invoke(["tokens", "list"], transport)
    assert result.exit_code == 0
    row = result.stdout.splitlines()[1]
    assert "\x1b" not in row
    assert row.split() == ["x\\x1b[2J", "[0,", "'a']", "everything", "-", "-", "-"]


def test_list_empty_and_json() -> None:
    assert invoke(["tokens", "list"], mock(FakeState(tokens={}))).stdout == "no tokens\n"
    body = b'[{"name": "dash",  "read": "*"}]'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    result = invoke(["tokens", "list", "--json"], transport)
    assert (result.exit_code, result.stdout) == (0, body.decode() + "\n")


def test_list_of_something_else_exits_1() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"tokens": []}))
    result = invoke(["tokens", "list"], transport)
    assert (result.exit_code, result.stdout) == (1, "")
    assert (
        result.stderr == "relayctl: unexpected answer from relayd at /run/relayd/admin.sock:"
        " not a list of tokens\n"
    )


# --- tokens add ----------------------------------------------------------------------


def test_add_prints_only_the_token_and_reads_all_by_default() -> None:
    state = FakeState()
    result = invoke(["tokens", "add", "dashboard"], mock(state))
    assert (result.exit_code, result.stdout) == (0, "rlyd_dashboard-3\n")
    assert result.stderr == (
        "relayctl: token dashboard: read all, write -, no expiry; it is shown only this once\n"
    )
    assert [(s.method, s.path, s.body) for s in state.seen] == [
        ("POST", "/v1/tokens", {"name": "dashboard", "read": "*"})
    ]
    assert state.tokens["dashboard"]["write"] == []


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (["--read", "all"], {"read": "*"}),
        (["--read", "ALL", "--write", "*"], {"read": "*", "write": "*"}),
        (["--read", "8002, 8001,8002"], {"read": [8001, 8002]}),
        (["--read", "", "--write", "8003"], {"read": [], "write": [8003]}),
        (["--write", "all"], {"read": "*", "write": "*"}),
        (["--expires", "90s"], {"read": "*", "expires_in": 90}),
        (["--expires", "15m"], {"read": "*", "expires_in": 900}),
        (["--expires", "12h"], {"read": "*", "expires_in": 43200}),
        (["--expires", "30d"], {"read": "*", "expires_in": 2592000}),
    ],
)
def test_add_sends_the_options_as_the_api_has_them(
    options: list[str], sent: dict[str, object]
) -> None:
    state = FakeState()
    result = invoke(["tokens", "add", "gw-7", *options], mock(state))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("rlyd_gw-7")
    assert state.seen[-1].body == {"name": "gw-7", **sent}


def test_add_says_what_the_token_may_do() -> None:
    args = ["tokens", "add", "gw", "--read", "8001,8002", "--write", "8001", "--expires", "1d"]
    result = invoke(args, mock(FakeState()))
    assert result.stderr == (
        "relayctl: token gw: read 8001,8002, write 8001, expires in 86400s;"
        " it is shown only this once\n"
    )


def test_add_json_prints_the_api_json_with_the_token() -> None:
    result = invoke(["tokens", "add", "dash2", "--json"], mock(FakeState()))
    assert (result.exit_code, result.stderr) == (0, "")
    assert json.loads(result.stdout) == token_object("dash2") | {"token": "rlyd_dash2-3"}


@pytest.mark.parametrize(
    ("status", "detail"),
    [(409, "a token named 'dash' exists"), (422, "expires_in is too long")],
)
def test_add_refused_exits_1_with_the_detail(status: int, detail: str) -> None:
    answer = httpx.Response(status, json={"detail": detail})
    result = invoke(["tokens", "add", "dash"], httpx.MockTransport(lambda request: answer))
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"relayctl: {detail}\n")


def test_add_existing_name_against_the_fake() -> None:
    state = FakeState()
    result = invoke(["tokens", "add", "dash", "--read", "8001"], mock(state))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "relayctl: a token named 'dash' exists\n"
    assert state.tokens["dash"]["read"] == "*"


@pytest.mark.parametrize(
    "answer",
    [
        {"name": "dash"},
        {"name": "dash", "token": ""},
        {"name": "dash", "token": 42},
        {"name": "dash", "token": "rlyd_a\nrm -rf"},
        {"name": "dash", "token": "rlyd_a b"},
        {"name": "dash", "token": "rlyd_\x1b[2J"},
    ],
)
def test_add_without_a_printable_token_in_the_answer_exits_1(answer: dict[str, object]) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(201, json=answer))
    result = invoke(["tokens", "add", "dash"], transport)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.endswith(": no token in it\n")


# --- tokens remove -------------------------------------------------------------------


def test_remove() -> None:
    state = FakeState()
    result = invoke(["tokens", "remove", "scales"], mock(state))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "token scales removed\n", "")
    assert [(s.method, s.path) for s in state.seen] == [("DELETE", "/v1/tokens/scales")]
    assert "scales" not in state.tokens


def test_remove_json_and_unknown() -> None:
    state = FakeState()
    result = invoke(["tokens", "remove", "dash", "--json"], mock(state))
    assert json.loads(result.stdout) == token_object("dash")
    again = invoke(["tokens", "remove", "dash"], mock(state))
    assert (again.exit_code, again.stdout) == (1, "")
    assert again.stderr == "relayctl: no token named 'dash'\n"


@pytest.mark.parametrize(("name", "path"), [(".", "%2E"), ("..", "%2E%2E"), ("a..b", "a..b")])
def test_remove_names_that_are_dots(name: str, path: str) -> None:
    state = FakeState(tokens={name: token_object(name)})
    result = invoke(["tokens", "remove", name], mock(state))
    assert (result.exit_code, result.stdout) == (0, f"token {name} removed\n")
    assert state.seen[-1].path == f"/v1/tokens/{path}"
    assert state.tokens == {}


def test_remove_from_a_relayd_without_tokens_says_why() -> None:
    answer = httpx.Response(404, json={"detail": "Not Found"})
    result = invoke(["tokens", "remove", "dash"], httpx.MockTransport(lambda request: answer))
    assert result.exit_code == 1
    assert result.stderr == (
        "relayctl: Not Found (relayd does not know DELETE /v1/tokens/dash:"
        f" is it older than relayctl {__version__}?)\n"
    )


# --- usage errors: nothing is sent ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["tokens", "add"], "Missing argument 'NAME'"),
        (["tokens", "add", "bad name"], "Invalid value for 'NAME': invalid token name"),
        (["tokens", "add", "x" * 65], "Invalid value for 'NAME': invalid token name"),
        (["tokens", "add", "../ports/8001"], "Invalid value for 'NAME'"),
        (["tokens", "add", "dash", "--read", "8001,abc"], "'--read': invalid port 'abc'"),
        (["tokens", "add", "dash", "--read", "0"], "'--read': invalid port '0'"),
        (["tokens", "add", "dash", "--read", "65536"], "'--read': invalid port '65536'"),
        (["tokens", "add", "dash", "--read", "8001,,8002"], "'--read': invalid port ''"),
        (["tokens", "add", "dash", "--write", "some"], "'--write': invalid port 'some'"),
        (["tokens", "add", "dash", "--expires", "30"], "'--expires': invalid duration '30'"),
        (["tokens", "add", "dash", "--expires", "3w"], "'--expires': invalid duration '3w'"),
        (["tokens", "add", "dash", "--expires", "0s"], "'--expires': invalid duration '0s'"),
        (["tokens", "add", "dash", "--expires", "99999d"], "between 1s and 36500d"),
        (["tokens", "add", "dash", "--expires", "-1d"], "'--expires': invalid duration '-1d'"),
        (["tokens", "remove"], "Missing argument 'NAME'"),
        (["tokens", "remove", "a/b"], "Invalid value for 'NAME': invalid token name"),
        (["tokens", "list", "--all"], "No such option: --all"),
        (["tokens", "show", "dash"], "No such command 'show'"),
    ],
)
def test_usage_errors_exit_2_before_any_request(args: list[str], error: str) -> None:
    state = FakeState()
    result = invoke(args, mock(state))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("Usage: relayctl tokens")
    assert error in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
        next(line for line in result.stderr.splitlines() if error in line)
    ]
    assert state.seen == []


# --- the same transports and options as every command --------------------------------


@pytest.mark.parametrize("how", ["options", "environment"])
def test_over_url_with_the_token(how: str) -> None:
    state = FakeState(token="s3cret")
    url_args = ["--url", "http://gw:8000", "--token", "s3cret"]
    env = {"RELAYCTL_URL": "http://gw:8000", "RELAYCTL_TOKEN": "s3cret"}
    args = [*url_args] if how == "options" else []
    result = invoke(
        [*args, "tokens", "add", "dash2"],
        mock(state, via_tcp=True),
        env=(env if how == "environment" else None),
    )
    assert (result.exit_code, result.stdout) == (0, "rlyd_dash2-3\n")
    assert state.seen[-1].authorization == "Bearer s3cret"
    wrong = invoke([*url_args[:3], "nope", "tokens", "list"], mock(state, via_tcp=True))
    assert (wrong.exit_code, wrong.stderr) == (1, "relayctl: missing or invalid bearer token\n")


# --- the installed relayctl ----------------------------------------------------------


def test_installed_token_into_a_shell_variable(fake: FakeRelayd) -> None:
    script = 'TOKEN=$("$0" tokens add dashboard --read all) || exit\nprintf "<%s>" "$TOKEN"\n'
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYCTL_") and k != "PYTHONASYNCIODEBUG"  # not relayctl's
    }
    proc = subprocess.run(
        ["bash", "-c", script, str(RELAYCTL)],
        capture_output=True,
        text=True,
        env=env | {"RELAYCTL_SOCKET": str(fake.path)},
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "<rlyd_dashboard-3>"
    assert proc.stderr == (
        "relayctl: token dashboard: read all, write -, no expiry; it is shown only this once\n"
    )
    assert fake.state.tokens["dashboard"]["read"] == "*"


# The tokens commands in the console script: a table and a refusal. Every outcome is
# checked in process above (remove, exists, bad --expires), and the console script's
# exit codes, usage errors included, in test_cli.py; a process costs 0.25 CPU-s.
INSTALLED_CASES: list[tuple[list[str], int, str, str]] = [
    (["tokens", "list"], 0, "NAME    READ", ""),
    (["tokens", "remove", "nobody"], 1, "", "relayctl: no token named 'nobody'\n"),
]


def test_installed_relayctl_tokens(fake: FakeRelayd) -> None:
    # Each case is one run against a state of its own: one fake, reset in between
    # would serialise them; several fakes would be several threads. Runs go at once.
    runs = []
    fakes = [fake]
    try:
        for i, (args, *_) in enumerate(INSTALLED_CASES):
            if i:
                fakes.append(FakeRelayd(FakeState(), fake.path.with_name(f"admin-{i}.sock")))
            runs.append(relayctl_bg(*args, env={"RELAYCTL_SOCKET": str(fakes[i].path)}))
        results = [finish(proc) for proc in runs]
    finally:
        for other in fakes[1:]:
            other.stop()
    for (args, code, stdout, stderr), (got, out, err) in zip(INSTALLED_CASES, results, strict=True):
        assert got == code, (args, err)
        assert out.startswith(stdout) if stdout else out == "", (args, out)
        assert stderr in err if stderr else err == "", (args, err)
        no_traceback(err)
