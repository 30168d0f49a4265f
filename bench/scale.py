"""Fan-out at scale (issue 17 part 1): fanout1000, fanout5000 and idle10k.

One generator process cannot read 100,000 frames/s from thousands of sockets,
so the clients live in ``scale_workers`` processes (bench/scaleworker.py: epoll
polled raw sockets, pre-built handshakes, the lean frame parser, latency on
every ``scale_sample``-th client only), driven over pipes. The devices and the
measurement window stay in the runner. The workers inherit the runner's core
(the generator's) and its scheduling, so gen_cpu_pct adds them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen as lg
from bench.procstat import Sampler, fd_count
from bench.scenarios import Hooks, Params, Relay, _settled_rss, _wait_fds

ROOT = Path(__file__).resolve().parent.parent


class Workers:
    """The generator processes of one scenario run."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(
        self,
        r: Relay,
        P: Params,
        clients: int,
        poll_period: float,
        sample: int,
        profiled: bool = False,
    ) -> dict[str, Any]:
        """Start the workers, each with its share of `clients`; wait until all connected.

        ``profiled``: the first worker runs on asyncio, not uvloop, for py-spy (uvloop
        calls the Python code from C, where py-spy sees only the loop).
        """
        n = max(1, min(P.scale_workers, clients))
        shares = [clients // n + (1 if i < clients % n else 0) for i in range(n)]
        for i, share in enumerate(shares):
            extra = ["--asyncio"] if profiled and i == 0 else []
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.scaleworker",
                    "--host",
                    r.host,
                    "--port",
                    str(r.ws_port),
                    "--clients",
                    str(share),
                    "--producers",
                    str(P.fanout_devices),
                    "--line-len",
                    str(P.line_len),
                    "--poll-period",
                    str(poll_period),
                    "--sample",
                    str(sample),
                    "--parallel",
                    str(P.scale_parallel),
                    *extra,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                    limit=1 << 26,  # a report carries the latency histogram
                )
            )
        ready = await asyncio.gather(*(self._read(p, "ready", 300.0) for p in self.procs))
        connected = sum(x["clients"] for x in ready)
        t0 = min(x["t_start"] for x in ready)
        t1 = max(x["t_last"] for x in ready)
        return {
            "clients_connected": connected,
            "connect_failed": sum(x["failed"] for x in ready),
            "connect_s": round(t1 - t0, 3),
            "connects_per_s": round(connected / (t1 - t0), 1) if t1 > t0 else None,
        }

    async def ask(self, line: str, event: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line.encode() + b"\n")
        return await asyncio.gather(*(self._read(p, event, timeout) for p in self.procs))

    @staticmethod
    async def _read(p: asyncio.subprocess.Process, event: str, timeout: float) -> dict[str, Any]:
        assert p.stdout is not None
        raw = await asyncio.wait_for(p.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"scale worker {p.pid} exited ({await p.wait()})")
        msg: dict[str, Any] = json.loads(raw)
        if msg.get("event") != event:
            raise RuntimeError(f"scale worker {p.pid}: expected {event!r}, got {msg}")
        return msg

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None and p.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    p.stdin.write(b"quit\n")
                    p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 20.0)
            except TimeoutError:
                p.kill()
                await p.wait()


def merged_latency(reports: list[dict[str, Any]]) -> lg.Latency:
    lat = lg.Latency()
    for rep in reports:
        for bucket, count in rep["hist"].items():
            lat.hist[int(bucket)] += count
        lat.over.extend(rep["over"])
        lat.max_us = max(lat.max_us, rep["max_us"])
    return lat


async def fanout_scale(
    r: Relay, P: Params, hooks: Hooks, clients: int, rate: float, name: str
) -> dict[str, Any]:
    """P.fanout_devices devices at `rate` lines/s each to `clients` clients in the workers."""
    workers = Workers()
    try:
        connect = await workers.start(
            r, P, clients, P.poll_period, P.scale_sample, profiled=hooks.worker_open is not None
        )
        prods = await lg.connect_producers(
            P.fanout_devices, lg.line_format(P.line_len), r.host, r.tcp_port
        )
        sampler = Sampler(r.pid)
        sampler.start()
        task = asyncio.get_running_loop().create_task(
            lg.run_paced(prods, rate, P.warmup + P.scale_s)
        )
        await asyncio.sleep(P.warmup)
        await hooks.opened(r, name, P.scale_s)
        if hooks.worker_open is not None:
            await hooks.worker_open(workers.pids[0], f"{name}.generator", P.scale_s)
        win = r.window()
        win.extra_pids = workers.pids
        win.open()
        c0 = sum(x["count"] for x in await workers.ask("on", "on"))
        await asyncio.sleep(P.scale_s)
        c1 = sum(x["count"] for x in await workers.ask("off", "off"))
        win.close()
        await task
        sent = sum(p.seq for p in prods)
        reps = await workers.ask(f"drain {sent} 30", "drained", 120.0)
        await sampler.stop()
        for p in prods:
            p.close()
    finally:
        await workers.stop()
    lat = merged_latency(reps)
    lines = sum(x["lines"] for x in reps)
    frames = sum(x["frames"] for x in reps)
    return {
        "clients": clients,
        **connect,
        "latency_clients": f"1 in {P.scale_sample}",
        "generators": len(workers.procs),
        "delivered_per_s": round((c1 - c0) / win.seconds),
        "expected_per_s": round(connect["clients_connected"] * P.fanout_devices * rate),
        "sent": sent,
        "lost": sum(x["lost"] for x in reps),
        "dups": sum(x["dups"] for x in reps),
        "bad": sum(x["bad"] for x in reps),
        "lines_per_frame": round(lines / frames, 2) if frames else None,
        "settled": all(x["settled"] for x in reps),
        "clients_alive": sum(x["alive"] for x in reps),
        **lat.summary(),
        "relay_cpu_pct": round(win.relay_cpu_pct, 1),
        "gen_cpu_pct": round(win.gen_cpu_pct, 1),
        "rss_max_kib": sampler.rss_max(),
        **win.noise(),
    }


async def _timed_metrics(r: Relay) -> tuple[float, int]:
    """Wall time (s) and size of one full GET /metrics on [http]."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(r.host, r.ws_port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: {r.host}\r\nConnection: close\r\n\r\n".encode())
    body = await asyncio.wait_for(reader.read(-1), 30.0)
    elapsed = time.monotonic() - t0
    writer.close()
    if not body.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/metrics: {body[:80]!r}")
    return elapsed, len(body)


async def _timed_ports_list(r: Relay) -> float:
    """Wall time (s) of `relayctl ports list` on the admin socket, the process included."""
    relayctl = ROOT / ".venv" / "bin" / "relayctl"
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(relayctl),
        "--socket",
        str(r.admin_socket),
        "ports",
        "list",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60.0)
    if proc.returncode != 0:
        raise RuntimeError(f"relayctl ports list: {err.decode(errors='replace')[:200]}")
    return time.monotonic() - t0


async def idle_scale(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """P.scale_idle_clients idle WebSocket clients: RSS per client, and how the admin
    side (``relayctl ports list``, ``/metrics``) answers while they are connected."""
    fmt = lg.line_format(P.line_len)
    warm = await lg.connect_consumers(1, lg.Latency(), 1, P.line_len, r.host, r.ws_port)
    [wp] = await lg.connect_producers(1, fmt, r.host, r.tcp_port)
    wp.send(20)
    await lg.drained(warm, 20, timeout=10.0)
    rss0 = await _settled_rss(r.pid)
    fd0 = fd_count(r.pid)
    n = P.scale_idle_clients
    workers = Workers()
    out: dict[str, Any] = {"clients": n}
    try:
        out.update(await workers.start(r, P, n, 0.05, 1_000_000))
        fd1 = await _wait_fds(r.pid, fd0 + n, 60.0)
        rss1 = await _settled_rss(r.pid)
        out.update(
            rss_base_kib=rss0,
            rss_clients_kib=rss1,
            rss_total_mib=round(rss1 / 1024, 1),
            kib_per_client=round((rss1 - rss0) / n, 2),
            fds_accepted_clients=fd1 - fd0,
        )
        if r.admin_socket is not None:  # relayd: the admin side under 10k clients
            metrics = [await _timed_metrics(r) for _ in range(3)]
            lists = [await _timed_ports_list(r) for _ in range(3)]
            out.update(
                metrics_ms=round(statistics.median(m[0] for m in metrics) * 1000, 1),
                metrics_ms_max=round(max(m[0] for m in metrics) * 1000, 1),
                metrics_bytes=metrics[-1][1],
                ports_list_s=round(statistics.median(lists), 3),
                ports_list_s_max=round(max(lists), 3),
            )
        out["clients_alive"] = sum(x["alive"] for x in await workers.ask("alive", "alive"))
    finally:
        await workers.stop()
        for c in warm:
            c.close()
        wp.close()
    return out


SCENARIOS = {
    "fanout1000": lambda r, P, h: fanout_scale(
        r, P, h, P.scale_clients[0], P.scale_rate_1000, "fanout1000"
    ),
    "fanout5000": lambda r, P, h: fanout_scale(
        r, P, h, P.scale_clients[1], P.scale_rate_5000, "fanout5000"
    ),
    "idle10k": idle_scale,
}
# Thousands of clients: relayd only by default (`--relays relayd,floor` still runs others).
SCALE = frozenset(SCENARIOS)
