"""Issue 15: the MQTT disk spool's write and replay rates (messages/s of ~100-byte records).

    .venv/bin/python -m bench.spool [--messages 1000000] [--batch 100] [--dir DIR]

Three phases on one spool in a fresh directory (on the disk, not a tmpfs), each
with ``sync()`` every second in the background, as the uplink runs it:

- write: the broker is down: ``append`` a batch, ``flush``, yield to the loop;
- replay: the broker is back after a restart: reopen, then ``read`` 1000 +
  ``ack`` each until the spool is empty;
- live: the broker is up: append a batch, flush, read it back, ack it (every
  message goes through the spool on its way out).

Prints one line per phase and a JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relayd.spool import Spool

TOPIC = "relayd/gw-0017/8001"
PAYLOAD = b"2026-12-03T05:00:00Z scale-1 gross=12.345 kg tare=0.100 kg net=12.245 kg st\n"
MAX_BYTES = 1 << 30


async def with_sync(spool: Spool, work: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """Run ``work`` with ``sync()`` every second; (messages, seconds, CPU seconds)."""
    done = asyncio.Event()

    async def syncer() -> None:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except TimeoutError:
                await spool.sync()

    task = asyncio.create_task(syncer())
    t0, c0 = time.perf_counter(), time.process_time()
    n = await work()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    await task
    return n, elapsed, cpu


async def write(spool: Spool, messages: int, batch: int) -> int:
    for _ in range(messages // batch):
        for _ in range(batch):
            spool.append(TOPIC, PAYLOAD)
        spool.flush()
        await asyncio.sleep(0)
    return messages // batch * batch


async def replay(spool: Spool) -> int:
    n = 0
    while got := spool.read(1000):
        for r in got:
            spool.ack(r.id)
        n += len(got)
        await asyncio.sleep(0)
    return n


async def live(spool: Spool, messages: int, batch: int) -> int:
    for _ in range(messages // batch):
        for _ in range(batch):
            spool.append(TOPIC, PAYLOAD)
        spool.flush()
        for r in spool.read(batch):
            spool.ack(r.id)
        await asyncio.sleep(0)
    return messages // batch * batch


async def main_async(directory: Path, messages: int, batch: int) -> dict[str, float]:
    out: dict[str, float] = {"messages": messages, "record_bytes": len(TOPIC) + len(PAYLOAD)}
    spool = Spool.open(directory, max_bytes=MAX_BYTES)
    n, s, c = await with_sync(spool, lambda: write(spool, messages, batch))
    out["write_per_s"], out["write_per_cpu_s"] = n / s, n / c
    out["spool_bytes"] = spool.bytes
    spool.close()
    report("write", n, s, c, f"{out['spool_bytes']:,} bytes")

    t0, c0 = time.perf_counter(), time.process_time()
    spool = Spool.open(directory, max_bytes=MAX_BYTES)
    out["reopen_s"], out["reopen_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    n, s, c = await with_sync(spool, lambda: replay(spool))
    assert n == messages // batch * batch, n
    out["replay_per_s"], out["replay_per_cpu_s"] = n / s, n / c
    report("replay", n, s, c, f"reopen {out['reopen_s']:.2f} s, {out['reopen_cpu_s']:.2f} s CPU")

    n, s, c = await with_sync(spool, lambda: live(spool, messages, batch))
    out["live_per_s"], out["live_per_cpu_s"] = n / s, n / c
    report("live", n, s, c, "append+flush+read+ack")
    spool.close()
    return out


def report(phase: str, n: int, s: float, cpu: float, note: str) -> None:
    print(
        f"{phase + ':':8}{n:>9,} messages in {s:6.2f} s = {n / s:>10,.0f}/s "
        f"({n / cpu:>10,.0f} per CPU s; {note})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=100, help="appends per flush (loop iteration)")
    p.add_argument("--dir", type=Path, default=None, help="parent directory (default: /var/tmp)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-bench-spool-", dir=args.dir or "/var/tmp") as d:
        out = asyncio.run(main_async(Path(d) / "spool", args.messages, args.batch))
    out["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps({"bench": "spool", **out}))


if __name__ == "__main__":
    main()
