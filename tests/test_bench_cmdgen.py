"""downlink50's command clients (bench/cmdgen.c): built here, run against a real relayd.

Bench code is not shipped, but issue 12's figures are only as right as this
generator: every command sent once, on time and never early, every answer
counted, the sampled commands' send times intact, errors reported as relayd
wrote them; whatever way TCP cuts relayd's frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from bench import downlink
from bench.scenarios import Params, Relay
from tests.helpers import MS, NotifySocket, free_port, run_daemon
from tests.test_downlink import connected, device, downlink_ports

pytestmark = pytest.mark.anyio

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "cmdgen.c"
COMMAND = re.compile(rb"([cC])(\d{3}) (\d{7}) (\d{16})")  # bench/cmdgen.c's command_frame
SMALL = {"CMDGEN_SNDBUF": "4096"}  # the clients' send buffers: the kernel defers writes early


@pytest.fixture(scope="module")
def cmdgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/cmdgen.c built as bench/bench.mk builds it, and here warnings are errors."""
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


def spawn(
    cmdgen: Path, args: tuple[object, ...], env: dict[str, str] | None
) -> Coroutine[Any, Any, asyncio.subprocess.Process]:
    """cmdgen with ``args``, its three standard streams piped, ``env`` added to ours."""
    return asyncio.create_subprocess_exec(
        cmdgen,
        *map(str, args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | (env or {}),
    )


class Run:
    """One cmdgen process: started, given its window, its JSON line and stderr read."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.start = self.until = 0.0

    @classmethod
    async def ready(cls, cmdgen: Path, *args: object, env: dict[str, str] | None = None) -> Run:
        proc = await spawn(cmdgen, args, env)
        assert proc.stdout is not None
        async with asyncio.timeout(10_000 * MS):
            line = await proc.stdout.readline()
        assert line == b"ready\n", line
        return cls(proc)

    def go(self, seconds: float, sample_from: float = 0.0) -> None:
        """Send for ``seconds`` from 50 ms on; ids from ``sample_from`` s after the start."""
        self.start = time.monotonic() + 0.05
        self.until = self.start + seconds
        assert self.proc.stdin is not None
        line = f"{self.start} {self.until} {self.start + sample_from}\n"
        self.proc.stdin.write(line.encode())

    async def result(self) -> dict[str, Any]:
        """The JSON line once it exited (status 0, nothing on stderr)."""
        async with asyncio.timeout(self.until - time.monotonic() + 10_000 * MS):
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
        clients, rate, sample, first = 3, 400, 4, 7
        gen = await Run.ready(
            cmdgen, "127.0.0.1", d.http_port, cmd_port, dev_port, first, clients, rate, sample
        )
        gen.go(0.5, sample_from=0.25)
        got = await gen.result()
        # Due at start + k / 1200 s for every k with a due time before until: 600.
        assert got["sent"] == 600
        assert (got["acked"], got["errors"], got["first_error"]) == (600, 0, None)
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
        assert due_us - 1 <= ts, (k, ts - due_us)  # never early
        assert ts <= gen.until * 1e6 + 5e6  # late only as the machine delays it
    assert per_client == dict.fromkeys(per_client, 200)
    assert sorted(sampled) == list(range(0, 600, sample))
    # Sampled commands sent from FROM (start + 0.25 s) on have their send time as id:
    # k = 300, 304, …, 596 (one command each 0.83 ms; more if the machine delays some),
    # their acks timed.
    assert 74 <= len(got["ack_us"]) < 150
    assert all(0 <= us < 10_000_000 for us in got["ack_us"])
    assert got["blocked"] == 0 and 0 <= got["cpu_pct"] < 100


async def test_a_refused_command_is_counted_with_relayds_sentence(
    tmp_path: Path, notify: NotifySocket, cmdgen: Path
) -> None:
    async with run_daemon(tmp_path, notify, nports=2) as d:
        off = d.ports[1]  # a port without downlink
        gen = await Run.ready(cmdgen, "127.0.0.1", d.http_port, d.ports[0], off, 0, 2, 50, 1)
        gen.go(0.2)
        got = await gen.result()
    assert got["sent"] == 20 and got["acked"] == 0 and got["errors"] == 20
    error = json.loads(got["first_error"])  # relayd's answer, whole (under 200 bytes)
    assert error == {"error": f"downlink is off on port {off}", "id": error["id"]}
    assert error["id"] is not None  # SAMPLE 1: every command had its send time as id
    assert got["ack_us"] == []


async def failure(
    cmdgen: Path, *args: object, window: float | None = None, env: dict[str, str] | None = None
) -> str:
    """A cmdgen that fails (before or after ``ready``): its one line on stderr."""
    proc = await spawn(cmdgen, args, env)
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


# --- against a stand-in for relayd: frames cut anywhere, long ones, writes the kernel defers


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked frame as a server sends it: 7-, 16- or 64-bit length."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


class StandIn:
    """One client's relayd: the 101, then an answer to each command (``answer``).

    Everything it writes goes in slices of 1..64 bytes, each its own TCP segment;
    it reads nothing until ``reading`` is set. Its socket's receive buffer is
    small, so a client that keeps sending meets a full send buffer.
    """

    def __init__(self, answer: Callable[[int, dict[str, Any]], bytes]) -> None:
        self.answer = answer
        self.reading = asyncio.Event()
        self.reading.set()
        self.commands: list[dict[str, Any]] = []
        self.pong = b""
        self.rng = random.Random(12)
        self.done = asyncio.get_running_loop().create_future()

    async def start(self) -> tuple[asyncio.Server, int]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(self.serve, sock=sock)
        return server, sock.getsockname()[1]

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = self.rng.randint(1, 64)
            writer.write(data[pos : pos + n])
            await writer.drain()
            pos += n

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            assert request.startswith(b"GET /ws?format=json&port=9 HTTP/1.1\r\n"), request
            assert re.search(rb"\r\nSec-WebSocket-Key: [A-Za-z0-9+/]{22}==\r\n", request)
            await self.send(
                writer,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n" + server_frame(9, b"hi"),  # a ping behind it
            )
            if not self.reading.is_set():  # the kernel's buffers fill, not asyncio's
                writer.transport.pause_reading()  # type: ignore[attr-defined]
                await self.reading.wait()
                writer.transport.resume_reading()  # type: ignore[attr-defined]
            while True:
                head = await reader.readexactly(2)
                n = head[1] & 0x7F
                assert head[1] & 0x80, "a client's frame is masked"
                if n == 126:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                assert await reader.readexactly(4) == b"\0\0\0\0"  # the zero mask key
                payload = await reader.readexactly(n)
                if head[0] == 0x8A:
                    self.pong += payload
                    continue
                assert head[0] == 0x81, head
                command = json.loads(payload)
                self.commands.append(command)
                await self.send(writer, self.answer(len(self.commands) - 1, command))
        except asyncio.IncompleteReadError:
            self.done.set_result(None)  # the client closed: all is read
        except BaseException as e:
            self.done.set_exception(e)
            raise
        finally:
            writer.close()


ERROR = b'{"error": "say \\"no\\" \\\\ \x01 \x00 caf\xc3\xa9 ' + b"x" * 300 + b'", "id": null}'


def answers(i: int, command: dict[str, Any]) -> bytes:
    """An error (16-bit length), an ack of 70,000 bytes (64-bit), a binary frame, acks."""
    ident = command.get("id")
    if i == 0:
        return server_frame(1, ERROR)
    ack = b'{"ack": %s, "port": 1, "delivered": 1' % json.dumps(ident).encode()
    if i == 1:
        return server_frame(1, ack + b', "pad": "' + b"p" * 70_000 + b'"}')
    if i == 2:
        return server_frame(2, b"\0\1\2") + server_frame(1, ack + b"}")  # binary: not counted
    return server_frame(1, ack + b"}")


async def test_frames_cut_anywhere_of_every_length_and_a_ping(cmdgen: Path) -> None:
    stand_in = StandIn(answers)
    server, port = await stand_in.start()
    async with server:
        gen = await Run.ready(cmdgen, "127.0.0.1", port, 9, 4242, 0, 1, 100, 1)
        gen.go(0.3)
        got = await gen.result()
        async with asyncio.timeout(5_000 * MS):
            await stand_in.done
    assert stand_in.pong == b"hi"
    assert got["sent"] == len(stand_in.commands) == 30
    assert (got["acked"], got["errors"]) == (29, 1)
    # The first 200 bytes of the answer, JSON-escaped; a byte that is not ASCII is U+FFFD.
    assert got["first_error"] == ERROR[:200].decode("ascii", "replace")
    assert len(got["ack_us"]) == 29  # SAMPLE 1, ids from the start: every ack timed
    for k, command in enumerate(stand_in.commands):
        assert command["port"] == 4242
        m = COMMAND.fullmatch(command["data"].encode())
        assert m is not None and m[1] == b"C" and int(m[2]) == 0 and int(m[3]) == k
        assert command["id"] == int(m[4])  # its send time, in µs


async def test_writes_the_kernel_defers_wait_for_epollout(cmdgen: Path) -> None:
    stand_in = StandIn(lambda i, command: server_frame(1, b'{"ack": null}'))
    stand_in.reading.clear()  # until the sending ends: the client's buffers fill
    server, port = await stand_in.start()
    async with server:
        gen = await Run.ready(cmdgen, "127.0.0.1", port, 9, 4242, 0, 1, 400, 10, env=SMALL)
        gen.go(0.3)
        asyncio.get_running_loop().call_at(gen.until, stand_in.reading.set)
        got = await gen.result()
        async with asyncio.timeout(5_000 * MS):
            await stand_in.done
    assert got["sent"] == len(stand_in.commands) == 120  # none lost, none cut
    assert got["blocked"] >= 1 and got["acked"] == 120
    seqs = [int(c["data"][5:12]) for c in stand_in.commands if c["data"][0] == "C"]
    assert seqs == list(range(0, 120, 10))  # in order


async def test_a_relay_that_never_reads_is_an_error(cmdgen: Path) -> None:
    stand_in = StandIn(lambda i, command: b"")
    stand_in.reading.clear()
    server, port = await stand_in.start()
    async with server:
        err = await failure(cmdgen, "127.0.0.1", port, 9, 1, 0, 1, 5000, 10, window=5.0, env=SMALL)
        stand_in.reading.set()  # now it reads to the end of what the client sent
        async with asyncio.timeout(5_000 * MS):
            await stand_in.done
    assert "client 0: over 65536 bytes wait to be sent: relayd does not read" in err


async def test_an_upgrade_refused_is_an_error(cmdgen: Path) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        err = await failure(cmdgen, "127.0.0.1", port, 9, 1, 0, 1, 10, 10)
    assert err == "cmdgen: client 0: upgrade refused: HTTP/1.1 403 Forbidden\n"


# --- as bench/downlink.py runs it


def relay(ws_port: int, dev_port: int, spare: tuple[int, ...] = ()) -> Relay:
    return Relay("relayd", cast(Any, None), "127.0.0.1", ws_port, dev_port, spare_cores=spare)


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


async def test_downlink_bench_runs_it_and_sums_its_processes(
    tmp_path: Path, notify: NotifySocket, cmdgen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(downlink, "CMDGEN", cmdgen)
    dev_port = free_port()
    async with run_daemon(tmp_path, notify, nports=1, extra=downlink_ports(dev_port)) as d:
        reader, writer = await device(dev_port)
        await connected(d, dev_port, 1)
        P = Params(downlink_clients=4, downlink_rate=50.0)
        spare = max(os.sched_getaffinity(0))  # as bench/run.py gives it on a bigger machine
        r = relay(d.http_port, dev_port, spare=(spare,))
        procs = await downlink._command_processes(r, d.ports[0], 2, P)
        assert [cpus_allowed(p.pid) for p in procs] == [str(spare)] * 2
        n = downlink.Counts()
        start = time.monotonic() + 0.05
        await downlink._commands(procs, start, start + 0.4, n)
        lines = await read_lines(reader, n.sent)
        writer.close()
    assert n.sent == 80 == len(lines)  # 2 processes x 2 clients x 50/s x 0.4 s
    assert (n.acked, n.errors, n.first_error, n.blocked) == (80, 0, None, 0)
    assert len(n.cpu_pct) == 2 and len(n.ack_us) == 80 // downlink.SAMPLE


async def test_downlink_bench_says_what_went_wrong(
    tmp_path: Path, cmdgen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(downlink, "CMDGEN", tmp_path / "cmdgen")
    with pytest.raises(RuntimeError, match=r"cmdgen is missing: run `make bench-deps`"):
        await downlink._command_processes(relay(1, 1), 1, 1)
    monkeypatch.setattr(downlink, "CMDGEN", cmdgen)
    nobody = relay(free_port(), 1)
    with pytest.raises(RuntimeError, match=r"did not start: cmdgen: client 0: cannot connect"):
        await downlink._command_processes(nobody, 1, 1)


async def test_downlink_bench_waits_for_what_the_outboxes_still_hold() -> None:
    """Devices are closed once they read every command acked (or it is clear they will not)."""

    class Dev:
        read = 0

    devs = [Dev(), Dev()]

    async def reading() -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)
            for d in devs:
                d.read += 1

    feeder = asyncio.create_task(reading())
    assert await downlink._devices_read(cast(Any, devs), 10, False, 5.0)
    await feeder
    assert sum(d.read for d in devs) == 10
    assert not await downlink._devices_read(cast(Any, devs), 11, False, 0.1)  # one never comes
