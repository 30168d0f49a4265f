"""relayctl send (relayctl(1)), against tests/test_cli.py's fakes.

Through a MockTransport: what is sent (``data`` for UTF-8 text, ``data_b64``
for other bytes), what is printed, which exit code. Then the installed console
script against FakeRelayd's socket, reading standard input from a pipe. The
real daemon writing to a device is in tests/test_cli_daemon.py.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import cli_send
from tests.helpers import examples
from tests.test_cli import RELAYCTL, TIMEOUT, FakeRelayd, FakeState, invoke, mock

pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.fixture
def fake() -> Iterator[FakeRelayd]:
    path = Path(tempfile.mkdtemp(prefix="relayctl-"))  # short: a Unix socket path
    server = FakeRelayd(FakeState(), path / "admin.sock")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(path, ignore_errors=True)


def sent(state: FakeState) -> bytes:
    """The bytes of the one send request the fake daemon received."""
    (seen,) = state.seen
    assert (seen.method, seen.path) == ("POST", "/v1/ports/8001/send")
    body = seen.body
    assert isinstance(body, dict)
    if "data" in body:
        assert "data_b64" not in body
        return str(body["data"]).encode()
    return base64.b64decode(body["data_b64"], validate=True)


def test_text_goes_as_data_and_the_count_is_printed() -> None:
    state = FakeState()
    result = invoke(["send", "8001", "T"], mock(state))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "sent to 2 device(s)\n", "")
    assert state.seen[-1].body == {"data": "T"}


def test_peer_addresses_one_device() -> None:
    state = FakeState()
    result = invoke(["send", "8001", "T", "--peer", "192.0.2.7:51234"], mock(state))
    assert (result.exit_code, result.stdout) == (0, "sent to 1 device(s)\n")
    assert state.seen[-1].body == {"data": "T", "peer": "192.0.2.7:51234"}


def test_json_prints_the_answer_unchanged() -> None:
    result = invoke(["send", "8001", "T", "--json"], mock(FakeState()))
    assert (result.exit_code, result.stdout) == (0, '{"delivered":2}\n')


def test_a_text_argument_that_is_not_utf8_goes_as_its_bytes() -> None:
    state = FakeState()
    # What Python makes of argv bytes that are not UTF-8 (surrogateescape).
    result = invoke(["send", "8001", os.fsdecode(b"\xff\x00T")], mock(state))
    assert result.exit_code == 0, result.stderr
    assert "data_b64" in state.seen[-1].body
    assert sent(state) == b"\xff\x00T"


@settings(max_examples=examples(50), deadline=None)  # CliRunner runs are slow on a shared machine
@given(data=st.binary(min_size=1, max_size=300))
def test_a_file_arrives_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("send") / "message"
    path.write_bytes(data)
    state = FakeState()
    result = invoke(["send", "8001", "--file", str(path)], mock(state))
    assert result.exit_code == 0, result.stderr
    assert sent(state) == data
    try:
        data.decode()
    except UnicodeDecodeError:
        assert "data_b64" in state.seen[-1].body


def test_text_of_control_characters_goes_in_base64_when_that_is_shorter() -> None:
    state = FakeState()
    result = invoke(["send", "8001", "--file", "-"], mock(state), input=b"\x00" * 300)
    assert result.exit_code == 0, result.stderr
    assert state.seen[-1].body == {"data_b64": base64.b64encode(b"\x00" * 300).decode()}
    for text in ("T", "\x1b[2J clear", "Gewicht 12,5 kg \N{SNOWMAN}\n"):
        state.seen.clear()
        assert invoke(["send", "8001", text], mock(state)).exit_code == 0
        assert state.seen[-1].body == {"data": text}


def test_standard_input_with_a_dash() -> None:
    state = FakeState()
    result = invoke(["send", "8001", "--file", "-"], mock(state), input=b"line 1\nline 2\n")
    assert (result.exit_code, result.stdout) == (0, "sent to 2 device(s)\n")
    assert state.seen[-1].body == {"data": "line 1\nline 2\n"}


def test_more_than_relayd_takes_is_refused_before_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_send, "MAX_MESSAGE", 4)
    (tmp_path / "big").write_bytes(b"12345")
    state = FakeState()
    result = invoke(["send", "8001", "--file", str(tmp_path / "big")], mock(state))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "relayctl: the message is larger than 4 bytes, more than relayd takes\n"
    assert state.seen == []
    (tmp_path / "big").write_bytes(b"1234")
    assert invoke(["send", "8001", "--file", str(tmp_path / "big")], mock(state)).exit_code == 0


@pytest.mark.parametrize(
    ("args", "detail"),
    [
        (["send", "8002", "T"], "port 8002: downlink is off on port 8002"),
        (["send", "9999", "T"], "port 9999 is not a listener"),
        (
            ["send", "8001", "T", "--peer", "192.0.2.8:1"],
            "port 8001: no peer 192.0.2.8:1 is connected to port 8001",
        ),
    ],
)
def test_refusals_exit_1_with_the_detail(args: list[str], detail: str) -> None:
    result = invoke(args, mock(FakeState()))
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"relayctl: {detail}\n")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["send", "8001"], "give TEXT or --file"),
        (["send", "8001", "T", "--file", "-"], "give TEXT or --file, not both"),
        (["send", "8001", "--file", "/nonexistent/x"], "cannot read /nonexistent/x: No such file"),
    ],
)
def test_usage_errors_say_what_is_wrong(args: list[str], error: str) -> None:
    state = FakeState()
    result = invoke(args, mock(state))
    assert result.exit_code == 2
    assert error in result.stderr
    assert state.seen == []


def test_installed_relayctl_sends_a_pipe(fake: FakeRelayd) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYCTL_") and k != "PYTHONASYNCIODEBUG"  # not relayctl's
    }
    proc = subprocess.run(
        [str(RELAYCTL), "send", "8001", "--file", "-"],
        input=b"\x00\xfe\xff",
        capture_output=True,
        env=env | {"RELAYCTL_SOCKET": str(fake.path)},
        timeout=TIMEOUT,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"sent to 2 device(s)\n", b"")
    assert sent(fake.state) == b"\x00\xfe\xff"
