"""downlink50 (issue 12): commands from clients to devices while fanout50 runs.

Two phases on one relay process: fanout50 alone (the baseline), then fanout50
again while ``downlink_clients`` clients each send ``downlink_rate`` commands/s
to the ``fanout_devices`` devices. A command goes to every device of the port,
so each device reads ``downlink_clients * downlink_rate`` commands/s.

The command clients use the JSON format on a connection subscribed to the
relay's second, device-less port (``commands``, found in ``/status.json``),
so they add no uplink fan-out of their own; each command names the devices'
port. The clients are one compiled process (bench/cmdgen.c, built by ``make
bench-deps``: epoll, raw sockets, pre-built frames), so that the generator is
not the limit; one command in SAMPLE carries its send time, and the device that
reads it records the round trip (client send -> device read) in a
``loadgen.Latency``.

Only relayd has a downlink: the reference relays report ``downlink_error``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import loadgen as lg
from bench.procstat import cpu_seconds
from bench.scenarios import Hooks, Params, Relay, fanout

ROOT = Path(__file__).resolve().parent.parent
CMDGEN = ROOT / ".venv" / "bench-bin" / "cmdgen"  # bench/cmdgen.c, built by `make bench-deps`
PROCESSES = 1  # cmdgen processes the clients are spread over: one does them all
SAMPLE = 10  # one command in SAMPLE carries its send time (the round trip's sample)


class CommandDevice(lg.Producer):
    """A device of the fan-out that also reads the commands written to it.

    Commands are counted by their newlines; only the sampled ones (``C…``,
    bench/cmdgen.c) are parsed for their send time.
    """

    def __init__(self, pid: int, fmt: bytes, lat: lg.Latency) -> None:
        super().__init__(pid, fmt)
        self.lat = lat
        self.read = 0  # commands read
        self.bad = 0
        self._carry = b""

    def close(self) -> None:
        """Not yet when fanout() is done: commands may still be on their way."""

    def close_now(self) -> None:
        super().close()

    def data_received(self, data: bytes) -> None:
        now = lg.mono_ns() // 1000
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        chunk = data[:cut]
        self.read += chunk.count(b"\n") - chunk.count(b"P\n")  # _all_connected's probes
        if b"C" not in chunk:
            return
        lat = self.lat
        for line in chunk.split(b"\n"):
            if line[:1] != b"C":
                continue
            try:
                ts = int(line[13:29])
            except ValueError:
                self.bad += 1
                continue
            if lat.on:
                d = max(0, now - ts)
                lat.max_us = max(lat.max_us, d)
                if d // 10 < lg.Latency.BUCKETS:
                    lat.hist[d // 10] += 1
                else:
                    lat.over.append(d)


def _user_sys_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of process ``pid`` (its main thread's and its reaped threads')."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _command_port(r: Relay) -> int:
    with urllib.request.urlopen(f"http://{r.host}:{r.ws_port}/status.json", timeout=5) as resp:
        ports = [p["port"] for p in json.load(resp)["ports"]]
    others = [p for p in ports if p != r.tcp_port]
    if not others:
        raise RuntimeError("the relay has no second port for the command clients")
    return others[0]


class Counts:
    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.first_error: str | None = None
        self.cpu_pct: list[float] = []  # each cmdgen process's, while sending
        self.blocked = 0  # writes the kernel did not take whole (finished on EPOLLOUT)
        self.ack_us: list[int] = []  # sampled commands: client send -> its ack read (µs)

    def ack_summary(self) -> dict[str, float | None]:
        """The acks' round trip (client -> relayd -> client): relayd's share of a command's."""
        acks = sorted(self.ack_us)
        if not acks:
            return {"ack_p50_ms": None, "ack_p99_ms": None}
        at = lambda q: acks[min(len(acks) - 1, max(0, round(q * len(acks)) - 1))]  # noqa: E731
        return {"ack_p50_ms": lg._r(at(0.5) / 1000), "ack_p99_ms": lg._r(at(0.99) / 1000)}


async def _all_connected(url: str, port: int, devices: int, timeout: float = 30.0) -> None:
    """Until a probe reaches every device: relayd has accepted them all."""
    from websockets.asyncio.client import connect

    async with asyncio.timeout(timeout), connect(url, compression=None) as ws:
        while True:
            await ws.send(json.dumps({"port": port, "data": "P"}))
            if json.loads(await ws.recv()).get("delivered") == devices:
                return
            await asyncio.sleep(0.01)


async def _command_processes(
    r: Relay, cmd_port: int, procs: int, P: Params | None = None
) -> list[asyncio.subprocess.Process]:
    """``procs`` cmdgen processes sharing the ``P.downlink_clients`` clients, each one ready."""
    if not os.access(CMDGEN, os.X_OK):
        raise RuntimeError(f"{CMDGEN} is missing: run `make bench-deps` (builds bench/cmdgen.c)")
    started = []
    P = P or Params()
    clients, rate = P.downlink_clients, P.downlink_rate
    for k in range(procs):
        first, last = k * clients // procs, (k + 1) * clients // procs
        args = [r.host, r.ws_port, cmd_port, r.tcp_port, first, last - first, rate, SAMPLE]
        # On a machine of 3 cores or more the clients get a core of their own (the
        # relay's and the generator's stay theirs); on 2 they share the generator's.
        spare = r.spare_cores[k % len(r.spare_cores)] if r.spare_cores else None
        pin = ["taskset", "-c", str(spare)] if spare is not None else []
        proc = await asyncio.create_subprocess_exec(
            *pin,
            CMDGEN,
            *map(str, args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(proc)
    try:
        for proc in started:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60.0)
            if line != b"ready\n":
                assert proc.stderr is not None
                async with asyncio.timeout(5.0):  # it stopped: its one line on stderr
                    err = (await proc.stderr.read()).decode(errors="replace").strip()
                raise RuntimeError(f"cmdgen did not start: {err[:300]}")
    except BaseException:
        await _stop(started)
        raise
    return started


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    """Killed if still running, reaped, their pipes closed."""
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def _commands(
    procs: list[asyncio.subprocess.Process],
    start: float,
    until: float,
    n: Counts,
    sample_from: float | None = None,
) -> None:
    """Let them send from ``start`` to ``until``; their counts added to ``n``.

    Acks are timed for the sampled commands sent from ``sample_from`` (default
    ``start``) on.
    """
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(
            f"{start} {until} {start if sample_from is None else sample_from}\n".encode()
        )
        await proc.stdin.drain()
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), until - time.monotonic() + 30.0)
        if proc.returncode != 0:
            raise RuntimeError(f"cmdgen failed: {err.decode(errors='replace').strip()[:300]}")
        got = json.loads(out)
        n.sent += got["sent"]
        n.acked += got["acked"]
        n.errors += got["errors"]
        n.first_error = n.first_error or got["first_error"]
        n.cpu_pct.append(got["cpu_pct"])
        n.blocked += got["blocked"]
        n.ack_us.extend(got["ack_us"])


async def _devices_read(
    devices: list[CommandDevice], expected: int, refused: bool, timeout: float
) -> bool:
    """Until the devices have read ``expected`` commands; False if ``timeout`` runs out first.

    Every command acked was put in some devices' buffers; with refusals
    (``refused``), in fewer than all: then until the devices stop reading for a second.
    """
    last, still = -1, 0
    for _ in range(int(timeout * 100)):
        read = sum(d.read for d in devices)
        if read >= expected or (refused and still >= 100):
            return True
        last, still = read, still + 1 if read == last else 0
        await asyncio.sleep(0.01)
    return False


async def downlink50(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    base = await fanout(r, P, hooks, P.fanout_clients[0])
    out: dict[str, Any] = {
        "uplink_p99_base_ms": base.get("p99_ms"),
        "relay_cpu_pct_base": base.get("relay_cpu_pct"),  # fanout50 alone
        "gen_cpu_pct_base": base.get("gen_cpu_pct"),
        "downlink_clients": P.downlink_clients,
        "downlink_rate": P.downlink_rate,
    }
    try:
        cmd_port = _command_port(r)
    except Exception as e:  # the reference relays: no /status.json, no downlink
        out["downlink_error"] = f"{type(e).__name__}: {e}"[:200]
        return out | base

    cmd_lat = lg.Latency()
    devices: list[CommandDevice] = []
    connected = asyncio.Event()

    async def connect_devices(nd: int, fmt: bytes, host: str, port: int) -> list[lg.Producer]:
        for pid in range(nd):
            dev: CommandDevice = await lg._connect(
                lambda pid=pid: CommandDevice(pid, fmt, cmd_lat), host, port
            )
            devices.append(dev)
        connected.set()
        return list(devices)

    n = Counts()
    url = f"ws://{r.host}:{r.ws_port}/ws?format=json&port={cmd_port}"
    procs = await _command_processes(r, cmd_port, PROCESSES, P)  # off the clock

    async def commands() -> None:
        await asyncio.wait_for(connected.wait(), 60.0)  # fanout() connects them first
        await _all_connected(url, r.tcp_port, P.fanout_devices)
        start = time.monotonic() + 0.05
        until = start + P.warmup + P.fanout_s  # as long as fanout()'s devices send
        window = asyncio.get_running_loop().call_later(P.warmup, setattr, cmd_lat, "on", True)
        try:
            await _commands(procs, start, until, n, sample_from=start + P.warmup)
        finally:
            window.cancel()
            cmd_lat.on = False

    sender = asyncio.create_task(commands())
    try:
        loaded = await fanout(
            r, P, hooks, P.fanout_clients[0], name="downlink50", connect_devices=connect_devices
        )
    finally:
        try:
            await sender
            # What relayd's device outboxes still held when the last ack came.
            await _devices_read(devices, n.sent * P.fanout_devices, bool(n.errors), 2.0)
        finally:
            for dev in devices:
                dev.close_now()
            await _stop(procs)
    read = sum(d.read for d in devices)
    up99, base99 = loaded.get("p99_ms"), base.get("p99_ms")
    out.update(
        {
            **loaded,
            "commands_sent": n.sent,
            "commands_acked": n.acked,
            "command_errors": n.errors,
            "first_error": n.first_error,
            "cmdgen_cpu_pct": n.cpu_pct,
            "cmdgen_core": r.spare_cores[0] if r.spare_cores else r.gen_core,
            "cmdgen_blocked": n.blocked,
            "device_reads": read,
            "commands_unanswered": n.sent - n.acked - n.errors,  # after 5 s
            "device_reads_expected": n.sent * P.fanout_devices,  # were none refused
            "device_reads_bad": sum(d.bad for d in devices),
            "cmd_n": cmd_lat.n,
            "cmd_p50_ms": lg._r(cmd_lat.percentile(0.5)),
            "cmd_p99_ms": lg._r(cmd_lat.percentile(0.99)),
            "cmd_max_ms": lg._r(cmd_lat.max_us / 1000 if cmd_lat.n else None),
            **n.ack_summary(),
            "uplink_p99_ratio": round(up99 / base99, 2) if up99 and base99 else None,
        }
    )
    return out


async def downlink_cost(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """relayd's CPU time per command: the downlink50 commands alone, no uplink.

    CPU seconds (``/proc``) rather than latency: on a shared machine the relay's
    core is taken by others at times, which stretches latencies but not the
    work a command costs. From the first command sent until every device has
    read every command, so work left over after the sending ends counts too.
    """
    try:
        cmd_port = _command_port(r)
    except Exception as e:  # the reference relays: no /status.json, no downlink
        return {"downlink_error": f"{type(e).__name__}: {e}"[:200]}
    lat = lg.Latency()
    fmt = lg.line_format(P.line_len)
    devices: list[CommandDevice] = [
        await lg._connect(lambda pid=pid: CommandDevice(pid, fmt, lat), r.host, r.tcp_port)
        for pid in range(P.fanout_devices)
    ]
    procs = await _command_processes(r, cmd_port, PROCESSES, P)
    n = Counts()
    try:
        url = f"ws://{r.host}:{r.ws_port}/ws?format=json&port={cmd_port}"
        await _all_connected(url, r.tcp_port, P.fanout_devices)
        probes = sum(d.read for d in devices)
        cpu0 = cpu_seconds(r.proc.pid)
        user0, sys0 = _user_sys_seconds(r.proc.pid)
        start = time.monotonic() + 0.05
        await hooks.opened(r, "downlink_cost", P.fanout_s)  # --profile: py-spy from here
        lat.on = True
        await _commands(procs, start, start + P.fanout_s, n)
        expected = probes + n.sent * P.fanout_devices
        if not await _devices_read(devices, expected, bool(n.errors), 30.0):
            raise TimeoutError("the devices did not read every command in 30 s")
        cpu = cpu_seconds(r.proc.pid) - cpu0
        user1, sys1 = _user_sys_seconds(r.proc.pid)
    finally:
        for dev in devices:
            dev.close_now()
        await _stop(procs)
    return {
        "commands_sent": n.sent,
        "command_errors": n.errors,
        "relay_cpu_s": round(cpu, 3),
        "relay_cpu_us_per_command": round(cpu / n.sent * 1e6, 1) if n.sent else None,
        # of which in the kernel (system calls: reads, acks, device writes, epoll)
        "relay_sys_us_per_command": round((sys1 - sys0) / n.sent * 1e6, 1) if n.sent else None,
        "relay_user_us_per_command": round((user1 - user0) / n.sent * 1e6, 1) if n.sent else None,
        "cmd_p50_ms": lg._r(lat.percentile(0.5)),
        "cmd_p99_ms": lg._r(lat.percentile(0.99)),
        **n.ack_summary(),
        "cmdgen_cpu_pct": n.cpu_pct,
        "cmdgen_core": r.spare_cores[0] if r.spare_cores else r.gen_core,
        "cmdgen_blocked": n.blocked,
    }
