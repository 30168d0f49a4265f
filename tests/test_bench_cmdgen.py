"""downlink50's command clients (bench/cmdgen.c): built here, run against a real relayd.

Bench code is not shipped, but issue 12's figures are only as right as this
generator: every command sent once, on time and never early, every answer
counted, the sampled commands' send times intact, errors reported as relayd
wrote them; whatever way TCP cuts relayd's frames.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MS, NotifySocket, free_port, run_daemon
from tests.test_downlink import connected, device, downlink_ports

pytestmark = pytest.mark.anyio

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "cmdgen.c"
COMMAND = re.compile(rb"([cC])(\d{3}) (\d{7}) (\d{16})")  # bench/cmdgen.c's command_frame


@pytest.fixture(scope="module")
def cmdgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/cmdgen.c built as bench/bench.mk builds it (warnings are errors)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH: Debian's build-essential builds bench/cmdgen.c")
    binary = tmp_path_factory.mktemp("cmdgen") / "cmdgen"
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]
    built = subprocess.run(
        [cc, *flags, "-o", str(binary), str(SOURCE)], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    return binary


class Run:
    """One cmdgen process: started, given its window, its JSON line and stderr read."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.start = self.until = 0.0

    @classmethod
    async def ready(cls, cmdgen: Path, *args: object) -> Run:
        proc = await asyncio.create_subprocess_exec(
            cmdgen,
            *map(str, args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(10_000 * MS):
            line = await proc.stdout.readline()
        assert line == b"ready\n", line
        return cls(proc)

    async def result(self, seconds: float, sample_from: float | None = None) -> dict[str, Any]:
        """Send for ``seconds`` from 50 ms on; the JSON line once it exits (status 0)."""
        self.start = time.monotonic() + 0.05
        self.until = self.start + seconds
        assert self.proc.stdin is not None
        since = self.start if sample_from is None else self.start + sample_from
        self.proc.stdin.write(f"{self.start} {self.until} {since}\n".encode())
        async with asyncio.timeout(seconds + 10_000 * MS):
            out, err = await self.proc.communicate()
        assert self.proc.returncode == 0, err
        assert err == b""
        result = json.loads(out)
        assert isinstance(result, dict)
        return result


async def read_lines(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    lines: list[bytes] = []
    async with asyncio.timeout(10_000 * MS):
        while len(lines) < n:
            lines.append(await reader.readline())
    return lines


async def test_commands_go_on_time_are_acked_and_reach_the_device(
    tmp_path: Path, notify: NotifySocket, cmdgen: Path
) -> None:
    dev_port = free_port()
    async with run_daemon(
        tmp_path, notify, nports=1, extra=downlink_ports(dev_port), drain=0.5
    ) as d:
        reader, writer = await device(dev_port)
        await connected(d, dev_port, 1)
        cmd_port = d.ports[0]  # device-less: the clients' subscription
        clients, rate, sample, first = 3, 100, 4, 7
        gen = await Run.ready(
            cmdgen, "127.0.0.1", d.http_port, cmd_port, dev_port, first, clients, rate, sample
        )
        got = await gen.result(0.5, sample_from=0.25)
        # Due at start + k / 300 s for every k with a due time before until: 150.
        assert got["sent"] == 150
        assert (got["acked"], got["errors"], got["first_error"]) == (150, 0, None)
        lines = await read_lines(reader, got["sent"])
    async with asyncio.timeout(5_000 * MS):  # relayd closed the device when it stopped
        assert await reader.read() == b""  # so the device read exactly what was sent
    writer.close()
    per_client = dict.fromkeys(range(first, first + clients), 0)
    sampled = []
    for line in lines:
        m = COMMAND.fullmatch(line.removesuffix(b"\n"))
        assert m is not None, line
        kind, cid, seq, ts = m[1], int(m[2]), int(m[3]), int(m[4])
        per_client[cid] += 1
        if kind == b"c":  # the client's constant frame
            assert (seq, ts) == (0, 0)
            continue
        k = seq * clients + cid - first  # the command's place in the round robin
        sampled.append(k)
        due_us = gen.start * 1e6 + k * 1e6 / (clients * rate)
        assert due_us - 1 <= ts <= gen.until * 1e6, (k, ts - due_us)  # never early
    assert per_client == dict.fromkeys(per_client, 50)
    assert sorted(sampled) == list(range(0, 150, sample))
    # Sampled commands sent from FROM (start + 0.25 s) on have their send time as id:
    # k = 76, 80, …, 148 (one command each 3.3 ms), their acks timed.
    assert 15 <= len(got["ack_us"]) <= 20
    assert all(0 <= us < 10_000_000 for us in got["ack_us"])
    assert got["blocked"] == 0 and 0 <= got["cpu_pct"] < 100


async def test_a_refused_command_is_counted_with_relayds_sentence(
    tmp_path: Path, notify: NotifySocket, cmdgen: Path
) -> None:
    async with run_daemon(tmp_path, notify, nports=2) as d:
        off = d.ports[1]  # a port without downlink
        gen = await Run.ready(cmdgen, "127.0.0.1", d.http_port, d.ports[0], off, 0, 2, 50, 1)
        got = await gen.result(0.2)
    assert got["sent"] == 20 and got["acked"] == 0 and got["errors"] == 20
    error = json.loads(got["first_error"])  # relayd's answer, whole (under 200 bytes)
    assert error == {"error": f"downlink is off on port {off}", "id": error["id"]}
    assert error["id"] is not None  # SAMPLE 1: every command had its send time as id
    assert got["ack_us"] == []


async def failure(cmdgen: Path, *args: object, window: float | None = None) -> str:
    """A cmdgen that fails (before or after ``ready``): its one line on stderr."""
    proc = await asyncio.create_subprocess_exec(
        cmdgen,
        *map(str, args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    line = b""
    if window is not None:
        now = time.monotonic()
        line = f"{now} {now + window} {now}\n".encode()
    async with asyncio.timeout(10_000 * MS):
        out, err = await proc.communicate(line)
    assert proc.returncode == 1 and out in (b"", b"ready\n")
    assert err.startswith(b"cmdgen: ") and err.count(b"\n") == 1 and err.endswith(b"\n"), err
    return err.decode()


async def test_errors_are_one_line_and_exit_status_1(
    tmp_path: Path, notify: NotifySocket, cmdgen: Path
) -> None:
    assert "usage: cmdgen HOST" in await failure(cmdgen, "127.0.0.1")
    assert "RATE must be" in await failure(cmdgen, "127.0.0.1", 1, 2, 3, 0, 1, "fast", 10)
    async with run_daemon(tmp_path, notify, nports=1) as d:
        args = ("127.0.0.1", d.http_port, d.ports[0], d.ports[0], 0, 1, 10, 10)
        assert 'expected "START UNTIL FROM"' in await failure(cmdgen, *args)
        nobody = ("127.0.0.1", free_port(), *args[2:])
        assert "client 0: cannot connect to relayd" in await failure(cmdgen, *nobody)
        unknown = free_port()  # relayd upgrades, then closes with 1008 and why
        err = await failure(cmdgen, *args[:2], unknown, *args[3:], window=5.0)
        assert f"relayd closed the WebSocket: 1008 unknown port {unknown}" in err, err
