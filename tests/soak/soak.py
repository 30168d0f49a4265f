"""Soak test: relayd as a subprocess under devices and WebSocket clients that come and go.

    SOAK_SECONDS=180 .venv/bin/python tests/soak/soak.py     # or: make soak SOAK_SECONDS=180

50 devices connect to random listener ports, send lines for a while (sometimes
split across writes, sometimes in bursts, sometimes ending in a partial line,
sometimes vanishing with a TCP reset) and leave; 50 WebSocket clients do the
same on ``/ws`` (all ports or some, bare or JSON), except ``--steady`` of them
that stay connected throughout. Every few seconds the daemon's RSS (VmRSS), its
open fds (``/proc/<pid>/fd``) and its asyncio task count are sampled.

The task count comes without any endpoint: the daemon runs as
``soak.py --daemon ...``, which is ``relayd.daemon.main`` plus one task that
writes ``len(asyncio.all_tasks())`` to a file every second (that task is not
counted). ``--no-task-count`` runs plain ``python -m relayd`` instead.

It fails (exit 1) when a message a device sent and closed cleanly did not reach
every steady client exactly once and in order, when a client saw a message
nobody sent, or when, between the first and last third of the run after a
warm-up, RSS grew more than 10 %, open fds (net of the connections open at the
time) by more than 5, or tasks by more than 5, or when fds or tasks at rest
(no devices, only the steady clients) differ by more than that before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from websockets.asyncio.client import ClientConnection, connect

RSS_GROWTH = 0.10  # fraction
FD_GROWTH = 5
TASK_GROWTH = 5


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# The daemon side: relayd plus a task counter


async def count_tasks(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    while True:
        tmp.write_text(str(len(asyncio.all_tasks()) - 1))  # not this one
        os.replace(tmp, path)
        await asyncio.sleep(1)


def run_daemon(task_file: Path, argv: list[str]) -> int:
    from relayd import daemon

    serve = daemon.serve

    async def counted_serve(*args: Any, **kwargs: Any) -> int:
        counter = asyncio.create_task(count_tasks(task_file))
        try:
            return await serve(*args, **kwargs)
        finally:
            counter.cancel()

    daemon.serve = counted_serve
    return daemon.main(argv)


# The harness side


def open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # handed to the subprocess


def proc_stats(pid: int, task_file: Path | None) -> tuple[int, int, int | None]:
    """VmRSS in kB, open fds, and the task count the daemon last wrote (if any)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    tasks = None
    if task_file is not None:
        with contextlib.suppress(OSError, ValueError):
            tasks = int(task_file.read_text())
    return rss, fds, tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    tasks: int | None
    tcp: int
    ws: int

    @property
    def net_fds(self) -> int:
        return self.fds - self.tcp - self.ws


@dataclass
class Stats:
    sent: dict[str, str] = field(default_factory=dict)  # id -> message text
    required: set[str] = field(default_factory=set)  # ids that must reach steady clients
    device_sessions: Counter[str] = field(default_factory=Counter)
    client_sessions: Counter[str] = field(default_factory=Counter)
    client_messages: int = 0
    unknown: list[str] = field(default_factory=list)  # received, never sent
    errors: Counter[str] = field(default_factory=Counter)
    steady_lost: list[str] = field(default_factory=list)  # steady clients that were closed


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.rng = random.Random(args.seed)
        self.http_port = free_port()
        self.ports = [free_port() for _ in range(args.ports)]
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.stop = asyncio.Event()
        self.steady: list[list[str]] = [[] for _ in range(args.steady)]
        self.proc: asyncio.subprocess.Process | None = None
        self.task_file = workdir / "tasks"

    # The daemon

    async def start(self) -> None:
        cfg = self.dir / "relayd.toml"
        text = f'[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n\n[drain]\ntimeout = 2.0\n'
        for i, port in enumerate(self.ports):
            framing = "lines"
            text += f'\n[[ports]]\nport = {port}\nhost = "127.0.0.1"\nname = "soak-{i}"\n'
            text += f'framing = "{framing}"\n'
        cfg.write_text(text)
        argv = [
            "--config",
            str(cfg),
            "--admin-socket",
            str(self.dir / "admin.sock"),
            "--state-dir",
            str(self.dir / "state"),
            "--log-level",
            self.args.log_level,
        ]
        if self.args.no_task_count:
            command = [sys.executable, "-m", "relayd", *argv]
        else:
            command = [sys.executable, __file__, "--daemon", str(self.task_file), "--", *argv]
        notify_path = self.dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.setblocking(False)
        ready = asyncio.Event()

        async def read_notify() -> None:  # as systemd does: all the time
            loop = asyncio.get_running_loop()
            while True:
                data = await loop.sock_recv(self.notify, 4096)
                if b"READY=1" in data.split(b"\n"):
                    ready.set()

        self.notify_task = asyncio.create_task(read_notify())
        self.log = self.dir / "relayd.log"
        log = open_log(self.log)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                stdout=log,
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )
        finally:
            log.close()
        async with asyncio.timeout(30):
            await ready.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await self.proc.wait()
        self.notify_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.notify_task
        self.notify.close()
        return code

    # Measurements

    async def metrics(self) -> dict[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n\r\n")
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        values: dict[str, float] = {}
        for line in data.decode().split("\r\n\r\n", 1)[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                family = name.split("{")[0]
                values[family] = values.get(family, 0.0) + float(value)  # summed over labels
        return values

    async def sample(self) -> Sample:
        assert self.proc is not None
        rss, fds, tasks = proc_stats(
            self.proc.pid, None if self.args.no_task_count else self.task_file
        )
        m = await self.metrics()
        return Sample(
            time.monotonic(),
            rss,
            fds,
            tasks,
            int(m.get("relayd_tcp_connections", 0)),
            int(m.get("relayd_ws_clients", 0)),
        )

    async def sampler(self) -> None:
        while not self.stop.is_set():
            self.samples.append(await self.sample())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.args.sample):
                    await self.stop.wait()

    async def at_rest(self) -> Sample:
        """A sample once only the steady clients are connected and the counter has ticked."""
        async with asyncio.timeout(30):
            while True:
                s = await self.sample()
                if s.tcp == 0 and s.ws == self.args.steady:
                    await asyncio.sleep(2.5)  # uvicorn's HTTP connections close, tasks recount
                    s = await self.sample()
                    if s.tcp == 0 and s.ws == self.args.steady:
                        return s
                await asyncio.sleep(0.5)

    # Devices

    async def device(self, n: int) -> None:
        rng = random.Random(self.rng.random())
        session = 0
        while not self.stop.is_set():
            session += 1
            port = rng.choice(self.ports)
            try:
                await self.device_session(rng, n, session, port)
            except OSError as exc:
                self.stats.errors[f"device: {type(exc).__name__}"] += 1
            await self.pause(rng.expovariate(1 / self.args.device_pause))

    async def device_session(self, rng: random.Random, n: int, session: int, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ending = rng.choices(["close", "partial", "reset", "silent"], weights=[75, 10, 10, 5])[0]
        self.stats.device_sessions[ending] += 1
        sent_here: list[str] = []
        deadline = time.monotonic() + rng.expovariate(1 / self.args.device_session)
        seq = 0
        try:
            while ending != "silent" and time.monotonic() < deadline and not self.stop.is_set():
                lines = []
                for _ in range(rng.choice([1, 1, 1, 2, 5])):  # sometimes a burst
                    seq += 1
                    ident = f"d{n}.{session}.{seq}"
                    text = ident + "|" + "é" * rng.randrange(3) + "x" * rng.randrange(200)
                    self.stats.sent[ident] = text
                    sent_here.append(ident)
                    lines.append(text.encode() + rng.choice([b"\n", b"\r\n"]))
                data = b"".join(lines)
                if rng.random() < 0.2:  # split anywhere, even inside a UTF-8 sequence
                    cut = rng.randrange(1, len(data))
                    writer.write(data[:cut])
                    await writer.drain()
                    await asyncio.sleep(rng.uniform(0, 0.05))
                    data = data[cut:]
                writer.write(data)
                await writer.drain()
                await self.pause(rng.expovariate(1 / self.args.message_interval), deadline)
            if ending == "partial":
                seq += 1
                ident = f"d{n}.{session}.{seq}"
                self.stats.sent[ident] = ident + "|partial"
                sent_here.append(ident)
                writer.write((ident + "|partial").encode())  # no newline: the last message
                await writer.drain()
            if ending == "silent":
                await self.pause(rng.uniform(0, self.args.device_session), deadline)
        finally:
            if ending == "reset":  # vanish: RST, data in flight may be lost
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                self.stats.required.update(sent_here)

    # Clients

    async def client(self, n: int) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            query = []
            if rng.random() < 0.3:
                query += [f"port={p}" for p in rng.sample(self.ports, rng.randint(1, 3))]
            envelope = rng.random() < 0.3
            if envelope:
                query.append("format=json")
            url = f"ws://127.0.0.1:{self.http_port}/ws" + ("?" + "&".join(query) if query else "")
            ending = rng.choice(["close", "abort"])
            self.stats.client_sessions[ending] += 1
            try:
                async with connect(url, max_queue=None, open_timeout=30) as ws:
                    reading = asyncio.create_task(self.read(ws, envelope, None))
                    await self.pause(rng.expovariate(1 / self.args.client_session))
                    if ending == "abort":
                        ws.transport.abort()
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reading
            except OSError as exc:
                self.stats.errors[f"client: {type(exc).__name__}"] += 1
            await self.pause(rng.expovariate(1 / self.args.client_pause))

    async def read(self, ws: ClientConnection, envelope: bool, into: list[str] | None) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                text = frame if isinstance(frame, str) else frame.decode(errors="replace")
                if envelope:
                    text = json.loads(text)["data"]
                ident = text.partition("|")[0]
                if self.stats.sent.get(ident) != text:
                    self.stats.unknown.append(text[:80])
                self.stats.client_messages += 1
                if into is not None:
                    into.append(ident)

    async def steady_client(self, n: int, connected: asyncio.Event) -> None:
        url = f"ws://127.0.0.1:{self.http_port}/ws"
        async with connect(url, max_queue=None) as ws:
            connected.set()
            await self.read(ws, False, self.steady[n])
            if not self.stop.is_set() or not self.done:
                self.stats.steady_lost.append(f"steady client {n}: closed {ws.close_code}")

    async def pause(self, seconds: float, deadline: float | None = None) -> None:
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop.wait()

    # The run

    async def run(self) -> int:
        args = self.args
        await self.start()
        assert self.proc is not None
        out(f"relayd pid {self.proc.pid}: http {self.http_port}, ports {self.ports}")
        self.done = False
        connected = [asyncio.Event() for _ in range(args.steady)]
        steady = [
            asyncio.create_task(self.steady_client(i, connected[i])) for i in range(args.steady)
        ]
        async with asyncio.timeout(30):
            for event in connected:
                await event.wait()
        rest_before = await self.at_rest()
        out(f"at rest before: {rest_before}")
        started = time.monotonic()
        workers = [asyncio.create_task(self.device(i)) for i in range(args.devices)]
        workers += [asyncio.create_task(self.client(i)) for i in range(args.clients - args.steady)]
        sampler = asyncio.create_task(self.sampler())
        next_report = started + 60
        while time.monotonic() - started < args.seconds:
            await asyncio.sleep(min(1.0, args.seconds - (time.monotonic() - started)))
            if self.proc.returncode is not None:
                out(f"relayd exited with {self.proc.returncode}")
                break
            if time.monotonic() >= next_report and self.samples:
                next_report += 60
                s = self.samples[-1]
                out(
                    f"{time.monotonic() - started:6.0f} s: rss {s.rss_kb} kB, fds {s.fds}, "
                    f"tasks {s.tasks}, devices {s.tcp}, clients {s.ws}, "
                    f"sent {len(self.stats.sent)}"
                )
        self.stop.set()
        await asyncio.gather(*workers, sampler)
        # Every required message reaches every steady client, then they may go.
        deadline = time.monotonic() + 30
        while True:
            missing = [self.stats.required - set(got) for got in self.steady]
            if not any(missing) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        rest_after = await self.at_rest()
        out(f"at rest after:  {rest_after}")
        final = await self.metrics()
        self.done = True
        code = await self.terminate()
        for task in steady:
            with contextlib.suppress(Exception):
                await task
        return self.report(started, missing, rest_before, rest_after, final, code)

    def report(
        self,
        started: float,
        missing: list[set[str]],
        before: Sample,
        after: Sample,
        final: dict[str, float],
        code: int,
    ) -> int:
        args, st = self.args, self.stats
        failures = []
        warm = min(60.0, args.seconds / 10)
        measured = [s for s in self.samples if s.t - started >= warm]
        third = max(1, len(measured) // 3)
        first, last = measured[:third], measured[-third:]

        def mean(values: list[float]) -> float:
            return statistics.fmean(values) if values else float("nan")

        rss = (mean([s.rss_kb for s in first]), mean([s.rss_kb for s in last]))
        fds = (mean([s.net_fds for s in first]), mean([s.net_fds for s in last]))
        raw_fds = (mean([s.fds for s in first]), mean([s.fds for s in last]))
        with_tasks = [s for s in measured if s.tasks is not None]
        tasks = (
            mean([s.tasks for s in first if s.tasks is not None]),
            mean([s.tasks for s in last if s.tasks is not None]),
        )
        duplicates = 0
        misordered = 0
        for got in self.steady:
            duplicates += len(got) - len(set(got))
            last_seq: dict[str, int] = {}
            for ident in got:
                dev, session, seq = ident.rsplit(".", 2)
                key = f"{dev}.{session}"
                if int(seq) <= last_seq.get(key, 0):
                    misordered += 1
                last_seq[key] = int(seq)
        lost = sum(len(m) for m in missing)
        optional = len(st.sent) - len(st.required)
        out("")
        out(f"soak: {args.seconds:.0f} s, seed {args.seed}, {len(self.samples)} samples")
        out(
            f"devices: {args.devices} ({sum(st.device_sessions.values())} sessions: "
            f"{dict(st.device_sessions)}), peak {max((s.tcp for s in self.samples), default=0)}"
            " connected"
        )
        out(
            f"clients: {args.clients} ({args.steady} steady; "
            f"{sum(st.client_sessions.values())} sessions of the others: "
            f"{dict(st.client_sessions)}), peak {max((s.ws for s in self.samples), default=0)}"
        )
        out(
            f"messages: {len(st.sent)} sent ({len(st.required)} from clean closes, {optional} "
            f"from resets), {st.client_messages} frames received by the harness, "
            f"relayd sent {final.get('relayd_messages_sent_total', 0):.0f}, dropped "
            f"{final.get('relayd_messages_dropped_total', 0):.0f}"
        )
        out(
            f"steady clients: lost {lost}, duplicates {duplicates}, out of order {misordered}, "
            f"unknown {len(st.unknown)}, closed early {len(st.steady_lost)}"
        )
        out(f"errors: {dict(st.errors) or 'none'}; relayd exit status {code}")
        out(f"measured after a {warm:.0f} s warm-up, first vs last third ({third} samples each):")
        out(
            f"  RSS  {rss[0] / 1024:8.1f} MiB -> {rss[1] / 1024:8.1f} MiB "
            f"({(rss[1] - rss[0]) / rss[0] * 100:+.1f} %, limit +{RSS_GROWTH * 100:.0f} %)"
        )
        out(
            f"  fds  {raw_fds[0]:8.1f} -> {raw_fds[1]:8.1f} raw; net of connections "
            f"{fds[0]:.1f} -> {fds[1]:.1f} ({fds[1] - fds[0]:+.1f}, limit +{FD_GROWTH})"
        )
        if with_tasks:
            out(f"  tasks {tasks[0]:7.1f} -> {tasks[1]:8.1f} ({tasks[1] - tasks[0]:+.1f})")
        else:
            out("  tasks: not sampled (--no-task-count)")
        out(
            f"at rest: fds {before.fds} -> {after.fds}, tasks {before.tasks} -> {after.tasks}, "
            f"RSS {before.rss_kb / 1024:.1f} -> {after.rss_kb / 1024:.1f} MiB"
        )
        if lost:
            sample = sorted(set().union(*missing))[:5]
            failures.append(f"{lost} message(s) missing at steady clients, e.g. {sample}")
        if duplicates or misordered or st.unknown:
            failures.append(
                f"duplicates {duplicates}, out of order {misordered}, unknown {st.unknown[:3]}"
            )
        if st.steady_lost:
            failures.append("; ".join(st.steady_lost[:3]))
        if final.get("relayd_messages_dropped_total"):
            failures.append("relayd dropped messages")
        if rss[1] > rss[0] * (1 + RSS_GROWTH):
            failures.append("RSS grew")
        if fds[1] - fds[0] > FD_GROWTH or after.fds - before.fds > FD_GROWTH:
            failures.append("open fds grew")
        if with_tasks and (
            tasks[1] - tasks[0] > TASK_GROWTH
            or (after.tasks or 0) - (before.tasks or 0) > TASK_GROWTH
        ):
            failures.append("tasks grew")
        if code not in (0, -signal.SIGTERM):
            failures.append(f"relayd exited with {code}")
        if self.proc is not None and not measured:
            failures.append("no samples")
        for failure in failures:
            out(f"FAIL: {failure}")
        out("soak: " + ("FAILED" if failures else "passed"))
        if failures:
            out(f"relayd log: {self.log}")
        return 1 if failures else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 1800)))
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--steady", type=int, default=10, help="clients connected throughout")
    p.add_argument("--ports", type=int, default=5)
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--message-interval", type=float, default=1.0, help="mean, per device")
    p.add_argument("--device-session", type=float, default=10.0, help="mean seconds connected")
    p.add_argument("--device-pause", type=float, default=2.0, help="mean seconds away")
    p.add_argument("--client-session", type=float, default=15.0, help="mean seconds connected")
    p.add_argument("--client-pause", type=float, default=2.0, help="mean seconds away")
    p.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", time.time())))
    p.add_argument("--log-level", default="warning")
    p.add_argument("--no-task-count", action="store_true", help="run plain python -m relayd")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if not 0 <= args.steady <= args.clients:
        p.error("--steady must be between 0 and --clients")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--daemon"]:  # soak.py --daemon TASK_FILE -- relayd arguments
        return run_daemon(Path(argv[1]), argv[3:])
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="relayd-soak-"))
    code = 1
    try:
        code = asyncio.run(Soak(args, workdir).run())
    finally:
        if args.keep or code:
            out(f"work directory kept: {workdir}")
        else:
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            workdir.rmdir()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
