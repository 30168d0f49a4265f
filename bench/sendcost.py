"""What one small write to each of N loopback TCP clients costs here (issue 17's floor).

    .venv/bin/python -m bench.sendcost [--clients 1000,5000] [--rounds 100] [--size 72]

fanout1000 and fanout5000 send every device line to every client: one ``send``
per client per line, whoever relays it. This measures that ``send`` alone, with
no relay around it: a reader process on the other core holds N connections and
drains them every 2 ms (as bench/scaleworker.py does); this process, on its own
core, sends a ``--size``-byte write to each of the N sockets once per round,
a round every 10 ms (fanout1000's line spacing). Two ways, each timed per
write (wall time, and the process's user and system CPU time):

  send      ``socket.send`` in a Python loop: what relayd's write path now does
  write     asyncio ``transport.write`` (what relayd did before)

``core_*_us`` split the sending core's time over the whole measurement (the
10 ms pauses included) per write, from /proc/stat: on loopback the sender's core
also runs the receiving socket's TCP input in softirq (and the delayed-ACK
timers armed there), which a process's own CPU time does not show.

``floor_pct`` is the share of one core the sends alone take at the scenario's
load (fanout1000: 100 lines/s to 1,000 clients; fanout5000: 20 lines/s to
5,000) — and ``flush_ms`` how long one line's fan-out takes at that cost, which
is the least latency the last client in the loop can see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import socket
import statistics
import sys
import time
from typing import Any

RATES = {1000: 100.0, 5000: 20.0}  # lines/s, all devices: fanout1000 and fanout5000


def reader(port: int, clients: int) -> int:
    """Accept ``clients`` connections on ``port``; drain them every 2 ms until stdin closes."""
    lsock = socket.create_server(("127.0.0.1", port), backlog=clients)
    ep = select.epoll()
    conns = {}
    for _ in range(clients):
        conn, _ = lsock.accept()
        conn.setblocking(False)
        conns[conn.fileno()] = conn
        ep.register(conn.fileno(), select.EPOLLIN)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    ep.register(sys.stdin.fileno(), select.EPOLLIN)
    buf = bytearray(1 << 16)
    while True:
        time.sleep(0.002)
        for fd, _ in ep.poll(0):
            if fd == sys.stdin.fileno():
                return 0
            try:
                if not conns[fd].recv_into(buf):
                    ep.unregister(fd)  # the first connection only probed that we listen
            except BlockingIOError:
                pass


STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def core_times(core: int | None) -> dict[str, float]:
    """Seconds the core (all cores: None) spent in each state so far, from /proc/stat."""
    name = "cpu" if core is None else f"cpu{core}"
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            words = line.split()
            if words[0] == name:
                return {k: int(v) / tick for k, v in zip(STAT_FIELDS, words[1:], strict=False)}
    return {}


def cores() -> tuple[int | None, int | None]:
    """This process's core and the reader's: two different ones when there are two."""
    have = sorted(os.sched_getaffinity(0))
    return (have[0], have[-1]) if len(have) > 1 else (None, None)


async def measure(clients: int, rounds: int, size: int) -> dict[str, Any]:
    mine, theirs = cores()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    lsock.close()
    taskset = ["taskset", "-c", str(theirs)] if theirs is not None else []
    proc = await asyncio.create_subprocess_exec(
        *taskset,
        sys.executable,
        "-m",
        "bench.sendcost",
        "--reader",
        str(port),
        str(clients),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    try:
        for _ in range(200):  # until the reader listens
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.01)
        for _ in range(clients - 1):  # the probe above was the first accepted connection
            t, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            transports.append(t)
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 60.0)
        socks = [t._sock for t in transports]  # type: ignore[attr-defined]
        payload = b"x" * size
        out: dict[str, Any] = {"clients": clients, "size": size, "rounds": rounds}
        for name in ("send", "write"):
            walls, users, systems = [], [], []
            before = core_times(mine)
            for _ in range(rounds):
                await asyncio.sleep(0.01)
                c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                if name == "send":
                    for s in socks:
                        s.send(payload)
                else:
                    for t in transports:
                        t.write(payload)
                w1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                n = len(socks)
                walls.append((w1 - w0) / n * 1e6)
                users.append((c1.ru_utime - c0.ru_utime) / n * 1e6)
                systems.append((c1.ru_stime - c0.ru_stime) / n * 1e6)
            after = core_times(mine)
            sends = rounds * len(socks)
            for key in ("user", "system", "softirq", "steal", "idle"):
                spent = after.get(key, 0.0) - before.get(key, 0.0)
                out[f"{name}_core_{key}_us"] = round(spent / sends * 1e6, 2)
            out[f"{name}_us"] = round(statistics.median(walls), 2)
            out[f"{name}_user_us"] = round(statistics.median(users), 2)
            out[f"{name}_sys_us"] = round(statistics.median(systems), 2)
        rate = RATES.get(clients)
        out["flush_ms"] = round(out["send_us"] * clients / 1000, 2)
        if rate is not None:
            out["lines_per_s"] = rate
            out["floor_pct"] = round(out["send_us"] * clients * rate / 1e4, 1)
        return out
    finally:
        for t in transports:
            t.abort()
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 10.0)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    raise_nofile()
    if len(sys.argv) == 4 and sys.argv[1] == "--reader":
        return reader(int(sys.argv[2]), int(sys.argv[3]))
    ap = argparse.ArgumentParser(
        prog="python -m bench.sendcost", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--clients", default="1000,5000")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--size", type=int, default=72, help="bytes per write (a 64-byte line's frame)")
    args = ap.parse_args()
    mine, _ = cores()
    if mine is not None:
        os.sched_setaffinity(0, {mine})
    for n in (int(x) for x in args.clients.split(",")):
        sys.stdout.write(json.dumps(asyncio.run(measure(n, args.rounds, args.size))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
