"""The scenarios of issue 6 (and of issues 11 and 16, relayd only).

Each takes a running relay and returns one flat dict. SETUP says how relayd is
configured for a scenario (TLS on [http], auth mode); RELAYD_ONLY are the
scenarios that need what only the current relayd has (wss, tokens, the status
page), which the runner does not start other relays for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from bench import loadgen as lg
from bench.procstat import Sampler, Window, fd_count, rss_kib


@dataclass
class Relay:
    """A relay under test, as the runner started it."""

    name: str
    proc: asyncio.subprocess.Process
    host: str
    ws_port: int
    tcp_port: int
    core: int | None = None  # the core the relay is pinned to
    gen_core: int | None = None  # the generator's
    spare_cores: tuple[int, ...] = ()  # neither's (a machine of 3 cores or more)
    tls: ssl.SSLContext | None = None  # set when [http] speaks TLS: the clients' context
    admin_socket: str | None = None  # relayd's, for creating tokens

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.ws_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def window(self) -> Window:
        return Window(self.pid, relay_core=self.core, gen_core=self.gen_core)


@dataclass(frozen=True)
class Params:
    line_len: int = 64
    warmup: float = 2.0
    throughput_s: float = 10.0
    fanout_devices: int = 10
    fanout_rate: float = 200.0  # lines/s per device
    fanout_s: float = 10.0
    fanout_clients: tuple[int, ...] = (50, 200)
    poll_from: int = 100  # from this many clients on, consumers are polled (see loadgen.Poller)
    poll_period: float = 0.002
    # wss clients (issue 11): "bio" reads them as ws clients are read and decrypts in memory
    # (bench/tlsread.py); "loop": through the event loop's SSL transport (before 2026-12-03)
    wss_reader: str = "bio"
    slow_healthy: int = 20
    slow_base_s: float = 10.0
    slow_s: float = 20.0
    slow_rcvbuf: int = 4096
    slow_fill_lines: int = 100_000  # ~6.5 MB: more than the kernel buffers towards one client
    slow_fill_timeout: float = 10.0  # a relay that blocks on the slow client never takes it all
    idle_devices: int = 1000
    idle_clients: int = 1000
    drain_devices: int = 4
    drain_rate: float = 5000.0  # lines/s, all devices together
    drain_clients: int = 10
    drain_before_s: float = 3.0
    drain_linger_s: float = 1.0  # devices keep streaming this long after SIGTERM
    drain_timeout: float = 5.0  # the relay's drain.timeout
    recover_missed: int = 1000  # messages the reconnecting client misses (recover50)
    connect_clients: int = 1000  # connect_none / connect_token (issue 11)
    connect_parallel: int = 50  # handshakes in flight at once
    connect_rounds: int = 3
    pages: int = 10  # fanout50_pages (issue 16): status pages open
    page_poll_s: float = 2.0  # each page's GET /status.json period (relayd/static/status.js)
    # issue 17, bench/scale.py: fanout1000, fanout5000 (clients, lines/s per device), idle10k
    scale_clients: tuple[int, ...] = (1000, 5000)
    scale_rate_1000: float = 10.0
    scale_rate_5000: float = 2.0
    scale_idle_clients: int = 10_000
    scale_s: float = 10.0
    scale_workers: int = 4  # generator processes holding the clients
    scale_parallel: int = 50  # handshakes in flight per generator process
    scale_sample: int = 10  # 1 client in this many records latency
    # issue 12, bench/downlink.py: downlink50's command clients and their commands/s each
    downlink_clients: int = 50
    downlink_rate: float = 100.0

    def quick(self) -> Params:
        return replace(
            self,
            warmup=0.5,
            throughput_s=2.0,
            fanout_s=2.0,
            fanout_clients=(10, 40),
            slow_healthy=5,
            slow_base_s=2.0,
            slow_s=3.0,
            idle_devices=100,
            idle_clients=100,
            drain_clients=3,
            drain_before_s=1.0,
            drain_linger_s=0.5,
            slow_fill_timeout=2.0,
            connect_clients=200,
            scale_clients=(100, 300),
            scale_idle_clients=500,
            scale_s=2.0,
        )


@dataclass
class Hooks:
    """Called by a scenario when its measurement window opens (for the profiler)."""

    window_open: Callable[[Relay, str, float], Awaitable[None]] | None = None
    # (generator pid, name, seconds): bench/scale.py's workers, for the profiler
    worker_open: Callable[[int, str, float], Awaitable[None]] | None = None

    async def opened(self, relay: Relay, scenario: str, seconds: float) -> None:
        if self.window_open is not None:
            await self.window_open(relay, scenario, seconds)


async def throughput(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """One device as fast as the relay takes it, one client."""
    lat = lg.Latency()
    fmt = lg.line_format(P.line_len)
    cons = await lg.connect_consumers(1, lat, 1, P.line_len, r.host, r.ws_port)
    [prod] = await lg.connect_producers(1, fmt, r.host, r.tcp_port)
    sampler = Sampler(r.pid)
    sampler.start()
    loop = asyncio.get_running_loop()
    task = loop.create_task(lg.blast(prod, time.monotonic() + P.warmup + P.throughput_s))
    await asyncio.sleep(P.warmup)
    await hooks.opened(r, "throughput", P.throughput_s)
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
    await sampler.stop()
    loss = lg.loss(cons, prod.seq)
    for c in cons:
        c.close()
    prod.close()
    return {
        "lines_per_s": round((c1 - c0) / win.seconds),
        "sent": prod.seq,
        "lost": loss.lost,
        "dups": loss.dups,
        "bad": loss.bad,
        "lines_per_frame": round(loss.lines / loss.frames, 2) if loss.frames else None,
        "settled": settled,
        **lat.summary(),
        "relay_cpu_pct": round(win.relay_cpu_pct, 1),
        "gen_cpu_pct": round(win.gen_cpu_pct, 1),
        "rss_max_kib": sampler.rss_max(),
        **win.noise(),
    }


async def fanout(
    r: Relay,
    P: Params,
    hooks: Hooks,
    clients: int,
    pages: int = 0,
    name: str = "",
    connect_devices: Callable[..., Awaitable[list[lg.Producer]]] | None = None,
) -> dict[str, Any]:
    """fanout_devices devices at fanout_rate lines/s each, `clients` clients (wss if r.tls).

    With `pages`, that many status pages are open besides: each one a
    /ws?format=json&batch_ms=250 client that gets every message, and a GET /status.json every
    page_poll_s seconds, as relayd/static/status.js does.
    ``connect_devices``: instead of loadgen.connect_producers (bench/downlink.py's
    devices also read commands).
    """
    lat = lg.Latency()
    fmt = lg.line_format(P.line_len)
    nd = P.fanout_devices
    poller = lg.Poller(P.poll_period) if clients >= P.poll_from else None
    if poller is not None:
        poller.start()
    cons = await lg.connect_consumers(
        clients,
        lat,
        nd,
        P.line_len,
        r.host,
        r.ws_port,
        poller=poller,
        tls=r.tls,
        tls_reader=P.wss_reader,
    )
    page_cons = await lg.connect_consumers(
        pages,
        lg.Latency(),
        nd,
        P.line_len,
        r.host,
        r.ws_port,
        tls=r.tls,
        path="/ws?format=json&batch_ms=250",  # as relayd/static/status.js asks
        kind=lg.PageConsumer,
        tls_reader=P.wss_reader,
    )
    prods = await (connect_devices or lg.connect_producers)(nd, fmt, r.host, r.tcp_port)
    sampler = Sampler(r.pid)
    sampler.start()
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    task = loop.create_task(lg.run_paced(prods, P.fanout_rate, P.warmup + P.fanout_s))
    stats = lg.PageStats()
    page_tasks = [
        loop.create_task(
            lg.poll_status(
                r.http_url,
                P.page_poll_s,
                t0 + i * P.page_poll_s / pages,
                t0 + P.warmup + P.fanout_s,
                stats,
                r.tls,
            )
        )
        for i in range(pages)
    ]
    await asyncio.sleep(P.warmup)
    await hooks.opened(r, name or f"fanout{clients}", P.fanout_s)
    win = r.window()
    win.open()
    c0 = lg.totals(cons)
    p0, g0 = lg.totals(page_cons), stats.gets
    lat.on = True
    await asyncio.sleep(P.fanout_s)
    lat.on = False
    c1 = lg.totals(cons)
    p1, g1 = lg.totals(page_cons), stats.gets
    win.close()
    await task
    await asyncio.gather(*page_tasks)
    sent = sum(p.seq for p in prods)
    settled = await lg.drained(cons, sent, timeout=30.0)
    await sampler.stop()
    loss = lg.loss(cons, sent)
    for c in cons:
        c.close()
    for p in prods:
        p.close()
    for c in page_cons:
        c.close()
    if poller is not None:
        await poller.stop()
    page_figures: dict[str, Any] = {}
    if pages:
        page_figures = {
            "pages": pages,
            "page_frames_per_s": round((p1 - p0) / win.seconds),
            "status_gets_per_s": round((g1 - g0) / win.seconds, 2),
            "status_errors": stats.errors,
            "status_bytes_mean": round(stats.bytes / stats.gets) if stats.gets else None,
        }
    return {
        "clients": clients,
        "tls": r.tls is not None,
        **page_figures,
        "consumers": (f"polled every {P.poll_period * 1000:g} ms" if poller else "event-driven")
        + (f", TLS read by {P.wss_reader}" if r.tls else ""),
        "delivered_per_s": round((c1 - c0) / win.seconds),
        "expected_per_s": round(clients * nd * P.fanout_rate),
        "sent": sent,
        "lost": loss.lost,
        "dups": loss.dups,
        "bad": loss.bad,
        "settled": settled,
        **lat.summary(),
        "relay_cpu_pct": round(win.relay_cpu_pct, 1),
        "gen_cpu_pct": round(win.gen_cpu_pct, 1),
        "rss_max_kib": sampler.rss_max(),
        **win.noise(),
    }


async def slow_client(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """Healthy clients with and without one client that connects and never reads.

    Before phase B is measured, a burst from extra devices fills the kernel's
    buffers towards the slow client (several MB on loopback) and the relay's
    queue for it, so that the 20 s window shows what the relay itself keeps.
    """
    fmt = lg.line_format(P.line_len)
    nd = P.fanout_devices
    lat_a, lat_b = lg.Latency(), lg.Latency()
    npr = nd + 1  # the paced devices and the burst device
    cons = await lg.connect_consumers(P.slow_healthy, lat_a, npr, P.line_len, r.host, r.ws_port)
    prods = await lg.connect_producers(nd, fmt, r.host, r.tcp_port)
    [filler] = await lg.connect_producers(1, fmt, r.host, r.tcp_port, first_id=nd)
    sampler = Sampler(r.pid, interval=0.5)
    loop = asyncio.get_running_loop()
    total = P.warmup + P.slow_base_s + P.slow_s + 60.0  # the burst may take a while
    task = loop.create_task(lg.run_paced(prods, P.fanout_rate, total))
    await asyncio.sleep(P.warmup)

    # phase A: healthy clients only
    win_a = r.window()
    win_a.open()
    a0 = lg.totals(cons)
    lat_a.on = True
    await asyncio.sleep(P.slow_base_s)
    lat_a.on = False
    a1 = lg.totals(cons)
    win_a.close()

    # phase B: one more client that never reads (small receive buffer, reading paused)
    [slow] = await lg.connect_consumers(
        1, lg.Latency(), npr, P.line_len, r.host, r.ws_port, rcvbuf=P.slow_rcvbuf
    )
    assert slow.transport is not None
    slow.transport.pause_reading()
    t_fill = time.monotonic()
    await lg.burst(filler, P.slow_fill_lines, t_fill + P.slow_fill_timeout)
    filled = await lg.caught_up(cons, nd, filler.seq - 1, P.slow_fill_timeout)
    fill_s = time.monotonic() - t_fill
    for c in cons:
        c.lat = lat_b
    sampler.start()
    rss0 = sampler.sample().rss
    win_b = r.window()
    win_b.open()
    b0 = lg.totals(cons)
    lat_b.on = True
    await asyncio.sleep(P.slow_s / 2)
    rss_mid = sampler.sample().rss
    await asyncio.sleep(P.slow_s / 2)
    lat_b.on = False
    b1 = lg.totals(cons)
    win_b.close()
    rss1 = sampler.sample().rss
    await sampler.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    sent = sum(p.seq for p in prods) + filler.seq
    settled = await lg.drained(cons, sent, timeout=30.0)
    loss = lg.loss(cons, sent)
    slow_alive = not slow.closed.done()
    slow.transport.abort()
    for c in cons:
        c.close()
    for p in [*prods, filler]:
        p.close()
    rate_a = (a1 - a0) / win_a.seconds
    rate_b = (b1 - b0) / win_b.seconds
    sa, sb = lat_a.summary(), lat_b.summary()
    p99a, p99b = sa["p99_ms"], sb["p99_ms"]
    return {
        "healthy": P.slow_healthy,
        "base_per_s": round(rate_a),
        "slow_per_s": round(rate_b),
        "healthy_ratio": round(rate_b / rate_a, 4) if rate_a else None,
        "p99_base_ms": p99a,
        "p99_slow_ms": p99b,
        "p99_ratio": round(p99b / p99a, 2) if p99a and p99b else None,
        "max_slow_ms": sb["max_ms"],
        "healthy_lost": loss.lost,
        "settled": settled,
        "fill_lines": filler.seq,
        "fill_s": round(fill_s, 2),
        "fill_reached_healthy": filled,
        "rss_start_kib": rss0,
        "rss_mid_kib": rss_mid,
        "rss_end_kib": rss1,
        "rss_growth_kib": rss1 - rss0,
        "rss_growth_2nd_half_kib": rss1 - rss_mid,
        "slow_client_still_connected": slow_alive,
        "relay_cpu_pct_base": round(win_a.relay_cpu_pct, 1),
        "relay_cpu_pct_slow": round(win_b.relay_cpu_pct, 1),
        "gen_cpu_pct": round(win_b.gen_cpu_pct, 1),
        **win_b.noise(),
    }


async def _wait_fds(pid: int, want: int, timeout: float) -> int:
    """Poll /proc/<pid>/fd until the relay holds `want` descriptors (accept() is invisible)."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        n = fd_count(pid)
    return n


async def _settled_rss(pid: int, timeout: float = 8.0) -> int:
    """RSS once two samples 0.5 s apart agree within 32 KiB (after at least 1 s)."""
    await asyncio.sleep(1.0)
    prev = rss_kib(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        cur = rss_kib(pid)
        if abs(cur - prev) <= 32:
            return cur
        prev = cur
    return prev


async def idle(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """RSS per idle device connection and per idle WebSocket client."""
    fmt = lg.line_format(P.line_len)
    lat = lg.Latency()
    # warm the relay's code paths once
    warm = await lg.connect_consumers(1, lat, 1, P.line_len, r.host, r.ws_port)
    [wp] = await lg.connect_producers(1, fmt, r.host, r.tcp_port)
    wp.send(20)
    await lg.drained(warm, 20, timeout=10.0)
    rss0 = await _settled_rss(r.pid)
    fd0 = fd_count(r.pid)

    devices = await lg.connect_producers(P.idle_devices, fmt, r.host, r.tcp_port, first_id=1)
    fd1 = await _wait_fds(r.pid, fd0 + P.idle_devices, 30.0)
    rss1 = await _settled_rss(r.pid)

    clients = await lg.connect_consumers(
        P.idle_clients, lat, 1, P.line_len, r.host, r.ws_port, parallel=100, timeout=120.0
    )
    fd2 = await _wait_fds(r.pid, fd1 + P.idle_clients, 30.0)
    rss2 = await _settled_rss(r.pid)
    devices_alive = sum(p.alive for p in devices)
    clients_alive = sum(not c.closed.done() for c in clients)
    for c in [*warm, *clients]:
        c.close()
    for p in [wp, *devices]:
        p.close()
    return {
        "devices": P.idle_devices,
        "clients": P.idle_clients,
        "rss_base_kib": rss0,
        "rss_devices_kib": rss1,
        "rss_clients_kib": rss2,
        "kib_per_device": round((rss1 - rss0) / P.idle_devices, 2),
        "kib_per_client": round((rss2 - rss1) / P.idle_clients, 2),
        "fds_accepted_devices": fd1 - fd0,
        "fds_accepted_clients": fd2 - fd1,
        "devices_alive": devices_alive,
        "clients_alive": clients_alive,
    }


async def drain(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """Devices streaming, SIGTERM: what reached every client, close code, time to exit."""
    fmt = lg.line_format(P.line_len)
    nd = P.drain_devices
    lat = lg.Latency()
    cons = await lg.connect_consumers(P.drain_clients, lat, nd, P.line_len, r.host, r.ws_port)
    prods = await lg.connect_producers(nd, fmt, r.host, r.tcp_port)
    loop = asyncio.get_running_loop()
    task = loop.create_task(
        lg.run_paced(prods, P.drain_rate / nd, P.drain_before_s + P.drain_linger_s)
    )
    await asyncio.sleep(P.drain_before_s)
    cutoffs = [p.seq for p in prods]
    t_sig = time.monotonic()
    os.kill(r.pid, signal.SIGTERM)
    await task
    sent_total = [p.seq for p in prods]
    for p in prods:
        p.close()
    exit_rc: int | None
    try:
        exit_rc = await asyncio.wait_for(r.proc.wait(), P.drain_timeout + 10.0)
        exit_s: float | None = round(time.monotonic() - t_sig, 3)
    except TimeoutError:
        exit_rc, exit_s = None, None
    pending = [c.closed for c in cons if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=3.0)
    pre = sum(cutoffs)
    shares = [sum(c.delivered_below(i, cutoffs[i]) for i in range(nd)) / pre for c in cons]
    post = sum(sent_total) - pre
    post_shares = [
        (sum(c.delivered_below(i, sent_total[i]) for i in range(nd)) - s * pre) / post
        for c, s in zip(cons, shares, strict=True)
        if post
    ]
    codes = Counter(str(c.close_code) for c in cons)
    for c in cons:
        c.close()
    return {
        "clients": P.drain_clients,
        "sent_before_sigterm": pre,
        "share_min": round(min(shares), 5),
        "share_mean": round(sum(shares) / len(shares), 5),
        "sent_after_sigterm": post,
        "after_share_min": round(min(post_shares), 4) if post_shares else None,
        "close_codes": dict(codes),
        "close_1001": codes.get("1001", 0) == len(cons),
        "exit_s": exit_s,
        "exit_rc": exit_rc,
    }


async def recover(r: Relay, P: Params, hooks: Hooks) -> dict[str, Any]:
    """fanout50, and meanwhile one client that leaves and comes back with ``?since``.

    It comes back once ``recover_missed`` messages were relayed without it, and
    measures how long after the last replayed message the first live one arrives
    (a message is live when relayd stamped it after the client reconnected).
    """
    probe = asyncio.create_task(_reconnect_probe(r, P))
    res = await fanout(r, P, hooks, P.fanout_clients[0])
    res.update(await probe)
    return res


async def _reconnect_probe(r: Relay, P: Params) -> dict[str, Any]:
    from datetime import datetime

    from websockets.asyncio.client import connect

    def ts(envelope: dict[str, Any]) -> float:
        return datetime.fromisoformat(envelope["ts"].replace("Z", "+00:00")).timestamp()

    url = f"ws://{r.host}:{r.ws_port}/ws?format=json&port={r.tcp_port}"
    out: dict[str, Any] = {"recover_gap_ms": None, "recover_replayed": None, "recovered": None}
    try:
        await asyncio.sleep(P.warmup + 0.2)
        async with connect(url, max_queue=None) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
        epoch, seq = first["epoch"], first["seq"]
        await asyncio.sleep(P.recover_missed / (P.fanout_devices * P.fanout_rate) + 0.05)
        since = f"{url}&since={r.tcp_port}:{epoch}:{seq}"
        back = time.time()
        async with connect(since, max_queue=None) as ws:
            status = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
            t_status = time.perf_counter()
            replayed, last_replay = 0, t_status
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
                now = time.perf_counter()
                if ts(m) < back:
                    replayed, last_replay = replayed + 1, now
                    continue
                break
        out.update(
            recover_gap_ms=round((now - last_replay) * 1000, 2),
            recover_replayed=replayed,
            recovered=status.get("recovered"),
            recover_replay_ms=round((last_replay - t_status) * 1000, 2),
        )
    except Exception as e:  # the reference relays know no ?since
        out["recover_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


async def _wait_fds_below(pid: int, most: int, timeout: float) -> int:
    """Poll /proc/<pid>/fd until the relay holds at most `most` descriptors."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n > most and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        n = fd_count(pid)
    return n


async def connect(r: Relay, P: Params, hooks: Hooks, token: bool) -> dict[str, Any]:
    """connect_clients WebSocket clients opened connect_parallel at a time, with or without
    a token (?access_token=, as a browser presents it): handshakes per second.

    connect_rounds rounds, each from no client to all of them and closed again
    before the next (the relay's descriptors back where they were); the rate is
    the median of the rounds, since one round lasts only about half a second.
    """
    path = "/ws"
    anonymous_refused = None
    fd0 = fd_count(r.pid)  # the relay's descriptors without any client
    if token:
        if r.admin_socket is None:
            raise RuntimeError("connect_token needs relayd's admin socket")
        secret = await lg.create_token(r.admin_socket, "bench")
        path = f"/ws?access_token={secret}"
        # The token check must really run: a client without one is refused.
        try:
            await lg.connect_consumers(1, lg.Latency(), 1, P.line_len, r.host, r.ws_port)
            anonymous_refused = False
        except ConnectionError:
            anonymous_refused = True
    lat = lg.Latency()
    # warm the handshake path once
    [warm] = await lg.connect_consumers(1, lat, 1, P.line_len, r.host, r.ws_port, path=path)
    warm.close()
    await _wait_fds_below(r.pid, fd0, 5.0)
    n = P.connect_clients
    rates, cpu_ms, relay_pct, gen_pct = [], [], [], []
    alive = n
    for i in range(P.connect_rounds):
        if i == 0:  # for the profiler: about the time the handshakes take (~2,000/s here)
            name = "connect_token" if token else "connect_none"
            await hooks.opened(r, name, max(1.0, P.connect_rounds * n / 2000))
        win = r.window()
        win.open()
        t0 = time.monotonic()
        clients = await lg.connect_consumers(
            n,
            lat,
            1,
            P.line_len,
            r.host,
            r.ws_port,
            parallel=P.connect_parallel,
            timeout=120.0,
            path=path,
        )
        elapsed = time.monotonic() - t0
        win.close()
        alive = min(alive, sum(not c.closed.done() for c in clients))
        rates.append(n / elapsed)
        cpu_ms.append(win.relay_cpu_pct / 100 * win.seconds / n * 1000)
        relay_pct.append(win.relay_cpu_pct)
        gen_pct.append(win.gen_cpu_pct)
        for c in clients:
            c.close()
        await _wait_fds_below(r.pid, fd0, 30.0)
    med = statistics.median
    return {
        "clients": n,
        "rounds": P.connect_rounds,
        "token": token,
        "anonymous_refused": anonymous_refused,
        "connects_per_s": round(med(rates), 1),
        "connects_per_s_rounds": [round(x) for x in rates],
        "relay_cpu_ms_per_connect": round(med(cpu_ms), 3),
        "relay_cpu_pct": round(med(relay_pct), 1),
        "gen_cpu_pct": round(med(gen_pct), 1),
        "clients_alive": alive,
        **win.noise(),
    }


SCENARIOS: dict[str, Callable[[Relay, Params, Hooks], Awaitable[dict[str, Any]]]] = {
    "throughput": throughput,
    "fanout50": lambda r, P, h: fanout(r, P, h, P.fanout_clients[0]),
    # Right after fanout50, so that the ratios against it compare runs a minute apart at
    # most. Issue 11: the same load over wss; issue 16: the same load with status pages.
    "fanout50_wss": lambda r, P, h: fanout(r, P, h, P.fanout_clients[0], name="fanout50_wss"),
    "fanout50_pages": lambda r, P, h: fanout(
        r, P, h, P.fanout_clients[0], pages=P.pages, name="fanout50_pages"
    ),
    "fanout200": lambda r, P, h: fanout(r, P, h, P.fanout_clients[1]),
    "recover50": recover,
    "slow": slow_client,
    "idle": idle,
    # issue 11: the cost of the token check
    "connect_none": lambda r, P, h: connect(r, P, h, token=False),
    "connect_token": lambda r, P, h: connect(r, P, h, token=True),
    "drain": drain,
}

# How relayd is configured for a scenario (the runner writes it into relayd.toml).
SETUP: dict[str, dict[str, Any]] = {
    "fanout50_wss": {"tls": True},
    "connect_token": {"auth": "token"},
}
RELAYD_ONLY = frozenset({"fanout50_wss", "connect_none", "connect_token", "fanout50_pages"})
# The default set of `make bench`: issue 6's scenarios, then the newer ones.
DEFAULT_SCENARIOS = tuple(SCENARIOS)
