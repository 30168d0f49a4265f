"""Sources beyond listening TCP (issue 14): a dialled device and a serial line.

    .venv/bin/python -m bench.sources [--seconds 10] [--repeat 3] [--serial-s 20]

``stream``: one device flat out to one WebSocket client, as bench.scenarios'
``throughput``, twice per repeat on a fresh relayd each time: the device dials
relayd's listener (``listen``), or relayd dials the device, a server this
bench runs (``connect``, a port added with ``POST /v1/ports``). Lines/s and
lines per relayd CPU-second; the target is connect/listen >= 0.9.

``serial``: a pty pair (``os.openpty``); relayd reads the slave as a serial
source at 115200 baud while the bench writes lines on the master paced at
11520 B/s (115200 baud, 8N1) for ``--serial-s``: every line must arrive, in
order.

relayd is pinned to one core and this generator to the other, as in
bench.run; the figures are medians of the repeats of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

from bench import loadgen as lg
from bench.run import HOST, ROOT, RelayProcess, free_ports
from bench.scenarios import Params, Relay

BAUD = 115200
BYTES_PER_S = BAUD / 10  # 8N1: ten bits per byte on the wire


async def add_port(r: Relay, body: dict[str, Any]) -> None:
    """POST /v1/ports on relayd's admin socket."""
    import httpx

    assert r.admin_socket is not None
    transport = httpx.AsyncHTTPTransport(uds=r.admin_socket)
    async with httpx.AsyncClient(transport=transport, base_url="http://relayd") as client:
        resp = await client.post("/v1/ports", json=body, timeout=10.0)
        resp.raise_for_status()


async def connected_device(r: Relay, fmt: bytes) -> tuple[int, lg.Producer, asyncio.Server]:
    """A device server relayd dials (a runtime ``connect`` port); its one device."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[lg.Producer] = loop.create_future()

    def device() -> lg.Producer:
        p = lg.Producer(0, fmt)
        if not accepted.done():
            accepted.set_result(p)
        return p

    server = await loop.create_server(device, HOST, 0)
    [port] = free_ports(1)
    device_port = server.sockets[0].getsockname()[1]
    await add_port(r, {"port": port, "connect": f"{HOST}:{device_port}"})
    prod = await asyncio.wait_for(accepted, 15.0)
    return port, prod, server


async def stream(r: Relay, P: Params, kind: str) -> dict[str, Any]:
    """One device as fast as relayd takes it, one client (``throughput`` per kind)."""
    lat = lg.Latency()
    fmt = lg.line_format(P.line_len)
    server: asyncio.Server | None = None
    if kind == "listen":
        port = r.tcp_port
        cons = await lg.connect_consumers(
            1, lat, 1, P.line_len, r.host, r.ws_port, path=f"/ws?port={port}"
        )
        [prod] = await lg.connect_producers(1, fmt, r.host, port)
    else:
        port, prod, server = await connected_device(r, fmt)
        cons = await lg.connect_consumers(
            1, lat, 1, P.line_len, r.host, r.ws_port, path=f"/ws?port={port}"
        )
    task = asyncio.create_task(lg.blast(prod, time.monotonic() + P.warmup + P.throughput_s))
    await asyncio.sleep(P.warmup)
    win = r.window()
    win.open()
    c0 = lg.totals(cons)
    lat.on = True
    await asyncio.sleep(P.throughput_s)
    lat.on = False
    c1 = lg.totals(cons)
    win.close()
    await task
    settled = await lg.drained(cons, prod.seq, timeout=60.0)
    loss = lg.loss(cons, prod.seq)
    for c in cons:
        c.close()
    prod.close()
    if server is not None:
        server.close()
    rate = (c1 - c0) / win.seconds
    cpu = win.relay_cpu_pct
    return {
        "kind": kind,
        "lines_per_s": round(rate),
        "relay_cpu_pct": round(cpu, 1),
        "lines_per_cpu_s": round(rate / (cpu / 100)) if cpu else None,
        "sent": prod.seq,
        "lost": loss.lost,
        "settled": settled,
        **lat.summary(),
    }


async def serial_line(r: Relay, P: Params, seconds: float) -> dict[str, Any]:
    """Lines paced at 115200 baud into a pty that relayd reads as a serial source."""
    master, slave = os.openpty()
    tty.setraw(slave)  # until relayd opens it (pyserial sets raw mode too): no echo
    os.set_blocking(master, False)
    try:
        [port] = free_ports(1)
        await add_port(r, {"port": port, "serial": os.ttyname(slave), "baudrate": BAUD})
        lat = lg.Latency()
        fmt = lg.line_format(P.line_len)
        [cons] = await lg.connect_consumers(
            1, lat, 1, P.line_len, r.host, r.ws_port, path=f"/ws?port={port}"
        )
        await _serial_open(r, port)
        sent = written = 0
        pending = b""
        start = time.monotonic()
        lat.on = True
        while (now := time.monotonic()) < start + seconds or pending:
            allowed = int((now - start) * BYTES_PER_S) - written  # the wire's pace
            while len(pending) < allowed and now < start + seconds:
                pending += fmt % (0, sent, lg.mono_ns() // 1000)
                sent += 1
            if allowed > 0 and pending:
                try:
                    n = os.write(master, pending[:allowed])
                except BlockingIOError:
                    n = 0
                written += n
                pending = pending[n:]
            await asyncio.sleep(0.005)
        lat.on = False
        elapsed = time.monotonic() - start
        settled = await lg.drained([cons], sent, timeout=30.0)
        loss = lg.loss([cons], sent)
        cons.close()
        return {
            "kind": "serial",
            "seconds": round(elapsed, 1),
            "bytes_per_s": round(written / elapsed),
            "lines_sent": sent,
            "lines_received": cons.count,
            "lost": loss.lost,
            "dups": loss.dups,
            "reordered": cons.reordered,
            "bad": loss.bad,
            "settled": settled,
            **lat.summary(),
        }
    finally:
        os.close(master)
        os.close(slave)


async def _serial_open(r: Relay, port: int, timeout: float = 15.0) -> None:
    """Until relayd says the serial port is ``connected``."""
    import httpx

    assert r.admin_socket is not None
    transport = httpx.AsyncHTTPTransport(uds=r.admin_socket)
    async with (
        asyncio.timeout(timeout),
        httpx.AsyncClient(transport=transport, base_url="http://relayd") as client,
    ):
        while True:
            resp = await client.get(f"/v1/ports/{port}", timeout=5.0)
            if resp.json().get("state") == "connected":
                return
            await asyncio.sleep(0.05)


async def amain(args: argparse.Namespace) -> int:
    P = Params(warmup=args.warmup, throughput_s=args.seconds)
    cores = sorted(os.sched_getaffinity(0))
    relay_core: int | None = cores[0]
    gen_core: int | None = cores[-1]
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[-1]})
    else:
        relay_core = gen_core = None
    exe = ROOT / ".venv" / "bin" / "relayd"
    runs: dict[str, list[dict[str, Any]]] = {"listen": [], "connect": []}
    serial: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="relayd-bench-sources-") as tmp:

        async def fresh(kind: str) -> dict[str, Any]:
            workdir = Path(tmp) / kind
            workdir.mkdir(exist_ok=True)
            rp = RelayProcess("relayd", relay_core, gen_core, workdir, P, exe=exe)
            r = await rp.start()
            try:
                if kind == "serial":
                    return await serial_line(r, P, args.serial_s)
                return await stream(r, P, kind)
            finally:
                await rp.stop()

        for i in range(args.repeat):
            for kind in ("listen", "connect") if i % 2 == 0 else ("connect", "listen"):
                res = await fresh(kind)
                runs[kind].append(res)
                _line(res)
        if args.serial_s > 0:
            serial = await fresh("serial")
            _line(serial)
    med = {k: {m: statistics.median(r[m] for r in v) for m in _METRICS} for k, v in runs.items()}
    ratio = med["connect"]["lines_per_s"] / med["listen"]["lines_per_s"]
    ratio_cpu = med["connect"]["lines_per_cpu_s"] / med["listen"]["lines_per_cpu_s"]
    out = sys.stdout
    out.write(f"\n# medians of {args.repeat} runs, {args.seconds:g} s each\n")
    out.write(
        "| source | lines/s | relayd CPU % | lines per CPU-s | p99 ms |\n|---|---|---|---|---|\n"
    )
    for kind, m in med.items():
        out.write(
            f"| {kind} | {m['lines_per_s']:.0f} | {m['relay_cpu_pct']:.0f} |"
            f" {m['lines_per_cpu_s']:.0f} | {m['p99_ms']} |\n"
        )
    ok = ratio >= 0.9
    out.write(f"connect/listen: lines/s {ratio:.2f}, per CPU {ratio_cpu:.2f} (target >= 0.9)\n")
    if serial:
        keeps_up = serial["lost"] == 0 and serial["reordered"] == 0 and serial["bad"] == 0
        ok = ok and keeps_up and serial["lines_received"] == serial["lines_sent"]
        out.write(
            f"serial 115200 baud: {serial['lines_received']}/{serial['lines_sent']} lines in"
            f" {serial['seconds']} s ({serial['bytes_per_s']} B/s), lost {serial['lost']},"
            f" out of order {serial['reordered']}, p99 {serial['p99_ms']} ms\n"
        )
    out.write("targets met\n" if ok else "TARGET MISSED\n")
    return 0 if ok else 1


_METRICS = ("lines_per_s", "relay_cpu_pct", "lines_per_cpu_s", "p99_ms")


def _line(res: dict[str, Any]) -> None:
    sys.stdout.write(" ".join(f"{k}={v}" for k, v in res.items()) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, per stream run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serial-s", type=float, default=20.0, help="0: no serial run")
    args = parser.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
