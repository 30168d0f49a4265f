"""One generator process of the scale scenarios (bench/scale.py): many polled consumers.

    python -m bench.scaleworker --host H --port P --clients N --producers D --line-len L
        [--poll-period S] [--sample K] [--parallel M] [--path /ws]

Opens N WebSocket clients (loadgen.Consumer, read by one epoll Poller: raw
sockets, pre-built handshakes, the lean frame parser), then obeys one command
per stdin line and answers with one JSON line on stdout:

    (start)          {"event": "ready", "clients", "t_start", "t_last", "failed"}
    on / off         {"event": "on"|"off", "count"}   lines received so far
    drain SENT SECS  {"event": "drained", "settled", "lost", "dups", "bad", "frames",
                      "lines", "alive", "hist": {bucket: n}, "over": [...], "max_us"}
    quit / EOF       closes everything and exits

Only every K-th client records latency (--sample), and only those are read every
--poll-period; the others are read every --bulk-period (several frames per recv:
far fewer system calls and wake-ups) and count lines and check loss only. Times are CLOCK_MONOTONIC,
shared by every process of the host, so the runner can merge connect windows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_SITE = ROOT / ".venv" / "bench-site"
if BENCH_SITE.is_dir():
    sys.path.insert(0, str(BENCH_SITE))

from bench import loadgen as lg  # noqa: E402


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _connect_all(
    args: argparse.Namespace,
    pollers: tuple[lg.Poller, lg.Poller],
    lat: lg.Latency,
    quiet: lg.Latency,
) -> tuple[list[lg.Consumer], float, float, int]:
    sem = asyncio.Semaphore(args.parallel)
    last = 0.0
    failed = 0

    async def one(i: int) -> lg.Consumer | None:
        nonlocal last, failed
        async with sem:
            timed = i % args.sample == 0
            poller = pollers[0] if timed else pollers[1]
            c = lg.Consumer(
                lat if timed else quiet,
                args.producers,
                args.line_len,
                args.host,
                args.port,
                args.path,
            )
            try:
                await poller.connect(c, args.host, args.port)
                await asyncio.wait_for(c.opened, 60.0)
            except (OSError, ConnectionError, TimeoutError):
                failed += 1
                return None
            last = max(last, time.monotonic())
            return c

    t0 = time.monotonic()
    got = await asyncio.gather(*(one(i) for i in range(args.clients)))
    return [c for c in got if c is not None], t0, last, failed


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    pollers = (lg.Poller(args.poll_period), lg.Poller(args.bulk_period))
    for poller in pollers:
        poller.start()
    lat, quiet = lg.Latency(), lg.Latency()
    cons, t_start, t_last, failed = await _connect_all(args, pollers, lat, quiet)
    _emit(
        {
            "event": "ready",
            "clients": len(cons),
            "t_start": t_start,
            "t_last": t_last,
            "failed": failed,
        }
    )
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        words = raw.decode().split()
        if not words or words[0] == "quit":
            break
        cmd = words[0]
        if cmd in ("on", "off"):
            lat.on = cmd == "on"
            _emit({"event": cmd, "count": lg.totals(cons)})
        elif cmd == "drain":
            sent, timeout = int(words[1]), float(words[2])
            settled = await lg.drained(cons, sent, timeout=timeout)
            loss = lg.loss(cons, sent)
            _emit(
                {
                    "event": "drained",
                    "settled": settled,
                    "lost": loss.lost,
                    "dups": loss.dups,
                    "bad": loss.bad,
                    "frames": loss.frames,
                    "lines": loss.lines,
                    "alive": sum(not c.closed.done() for c in cons),
                    "hist": {str(i): n for i, n in enumerate(lat.hist) if n},
                    "over": lat.over,
                    "max_us": lat.max_us,
                }
            )
        elif cmd == "alive":
            _emit({"event": "alive", "alive": sum(not c.closed.done() for c in cons)})
    for poller in pollers:
        await poller.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaleworker")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--producers", type=int, default=10)
    ap.add_argument("--line-len", type=int, default=64)
    ap.add_argument("--poll-period", type=float, default=0.002)
    ap.add_argument("--sample", type=int, default=1, help="every K-th client records latency")
    ap.add_argument("--bulk-period", type=float, default=0.05, help="poll period of the others")
    ap.add_argument("--parallel", type=int, default=50, help="handshakes in flight")
    ap.add_argument("--path", default="/ws")
    ap.add_argument(
        "--asyncio", action="store_true", help="no uvloop (py-spy then sees the Python stacks)"
    )
    args = ap.parse_args()
    if args.asyncio:
        return asyncio.run(amain(args))
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
