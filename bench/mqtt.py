"""The MQTT uplink (issue 15): publish rate, its cost under fanout50, spool rates.

    .venv/bin/python -m bench.mqtt [--quick] [--set fanout_s=5 ...] [--rt 0]
        [--markdown bench/RESULTS.md] [--profile DIR] [--only NAME,...] [--repeat N]

``--repeat N``: fanout50 off and on N times, alternating; the table has the medians.

One relayd per measurement (pinned to the first core, as in bench/run.py), a
local Mosquitto and the generator on the other core:

- publish_qos0 / publish_qos1: one device sends ``publish_lines`` lines of 64
  bytes as fast as relayd takes them; relayd publishes each one ([mqtt] qos 0
  or 1, payload "raw"). The rate is end to end: lines counted by a subscriber
  (``mosquitto_sub``, subscribed at QoS 0 so the broker->subscriber leg adds
  no acknowledgements of its own) over the time from the first line sent to
  the last one received. relay CPU over the same time.
- fanout50 with the uplink off, then on (qos 1, the broker keeps nothing: no
  subscriber), the fanout50 scenario of bench/scenarios.py: p99 and relay CPU,
  and the ratios on/off.
- spool: the broker is down; ``spool_lines`` lines are sent; spool write rate =
  lines / time until ``spooled`` of GET /v1/status reaches them all. Then the
  broker comes back: replay rate = lines / time from the first to the last one
  acknowledged (``spooled`` back to 0). A persistent QoS 1 session registered
  before the outage receives them afterwards: every line, counted.

Needs mosquitto and mosquitto_sub (Debian: mosquitto, mosquitto-clients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run import (
    BENCH_SITE,
    HOST,
    Profiler,
    RelayProcess,
    free_ports,
    open_log,
    override,
    raise_nofile,
)
from bench.scenarios import Hooks, Params, Relay, fanout

ROOT = Path(__file__).resolve().parent.parent
RELAYD = ROOT / ".venv" / "bin" / "relayd"
LINE = 64  # bytes per line, newline included (as bench/scenarios.py's)
TARGETS = {"publish_qos0": 50_000, "publish_qos1": 10_000}
RATIO_TARGET = 1.3
PROFILE_S = 5  # seconds of py-spy from the start of a publish measurement (--profile)
BEGIN, END = "<!-- bench-mqtt:begin -->", "<!-- bench-mqtt:end -->"


@dataclass(frozen=True)
class MqttParams:
    publish_lines: int = 100_000
    spool_lines: int = 100_000
    idle_s: float = 10.0  # a measurement ends when nothing moves for this long

    def quick(self) -> MqttParams:
        return dataclasses.replace(self, publish_lines=20_000, spool_lines=10_000, idle_s=5.0)


def pinned(core: int | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None else cmd


# --- Mosquitto and its subscriber --------------------------------------------------------


@contextlib.asynccontextmanager
async def mosquitto(workdir: Path, port: int, core: int | None) -> AsyncIterator[None]:
    """A broker on ``port``; its store in ``workdir`` (sessions survive a restart)."""
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\n"
        f"persistence true\npersistence_location {workdir}/\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"  # 0: no limit, never drop
        # As root, mosquitto would become user mosquitto, who cannot write the store here.
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    log = open_log(workdir / "mosquitto.log")
    try:
        proc = await asyncio.create_subprocess_exec(
            *pinned(core, ["mosquitto", "-c", str(conf)]), stdout=log, stderr=log
        )
    finally:
        log.close()
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, w = await asyncio.open_connection(HOST, port)
                except OSError:
                    if proc.returncode is not None:
                        raise RuntimeError("mosquitto exited at start") from None
                    await asyncio.sleep(0.02)
                    continue
                w.close()
                await w.wait_closed()
                break
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def lines_starting(text: bytes, head: bytes) -> int:
    return text.count(b"\n" + head) + text.startswith(head)


class Counter:
    """``mosquitto_sub`` on a topic filter: messages counted (one line each)."""

    def __init__(self) -> None:
        self.n = 0
        self.first = 0.0
        self.last = 0.0
        self.proc: asyncio.subprocess.Process | None = None
        self.moved = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def start(
        self, port: int, topic: str, qos: int, core: int | None, session: str = ""
    ) -> None:
        args = ["-h", HOST, "-p", str(port), "-t", topic, "-q", str(qos), "-F", "%p"]
        if session:
            args += ["-c", "-i", session]
        self.proc = await asyncio.create_subprocess_exec(
            *pinned(core, ["stdbuf", "-oL", "mosquitto_sub", "-d", *args]),
            stdout=asyncio.subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            limit=1 << 20,
        )
        self._task = asyncio.create_task(self._count())
        async with asyncio.timeout(10):
            await self.subscribed.wait()

    async def _count(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        rest = b""
        while chunk := await out.read(1 << 16):
            now = time.monotonic()
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            whole, rest = buf[:cut], buf[cut:]
            # -d also prints "Client ... received PUBLISH" per message, and "Subscribed
            # (mid ...)" once: count payloads only. A persistent session's queued
            # messages may come before the SUBACK.
            n = whole.count(b"\n") - lines_starting(whole, b"Client ")
            if b"Subscribed (mid" in whole:
                n -= lines_starting(whole, b"Subscribed (mid")
                self.subscribed.set()
            if n > 0:
                self.first = self.first or now
                self.n += n
                self.last = now
                self.moved.set()

    async def wait_for(self, n: int, idle_s: float) -> bool:
        """Until ``n`` messages arrived (True), or nothing arrived for ``idle_s`` (False)."""
        while self.n < n:
            self.moved.clear()
            try:
                await asyncio.wait_for(self.moved.wait(), idle_s)
            except TimeoutError:
                return False
        return True

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, AttributeError):
            self._task.cancel()
            await self._task


async def register_session(port: int, topic: str, session: str) -> None:
    """A persistent QoS 1 session: the broker keeps its messages while it is away."""
    proc = await asyncio.create_subprocess_exec(
        *("mosquitto_sub", "-h", HOST, "-p", str(port), "-t", topic, "-q", "1"),
        *("-c", "-i", session, "-E"),
    )
    async with asyncio.timeout(10):
        if await proc.wait() != 0:
            raise RuntimeError("mosquitto_sub -E failed")


# --- relayd ------------------------------------------------------------------------------


def mqtt_config(port: int, qos: int) -> str:
    return (
        f'\n[mqtt]\nurl = "mqtt://{HOST}:{port}"\nclient_id = "bench-relayd"\n'
        f'topic = "bench/{{port}}"\npayload = "raw"\nqos = {qos}\n'
    )


async def mqtt_status(r: Relay) -> dict[str, Any]:
    assert r.admin_socket is not None
    reader, writer = await asyncio.open_unix_connection(r.admin_socket)
    try:
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: relayd\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
    finally:
        writer.close()
    status = json.loads(raw.partition(b"\r\n\r\n")[2])
    mqtt = status["mqtt"]
    assert isinstance(mqtt, dict)
    return mqtt


async def wait_mqtt(
    r: Relay, done: Callable[[dict[str, Any]], bool], timeout: float = 30.0
) -> float:
    """Poll relayd's status every 5 ms until ``done(mqtt)``; the time it was seen."""
    async with asyncio.timeout(timeout):
        while True:  # a subprocess has no event to wait on
            if done(await mqtt_status(r)):
                return time.monotonic()
            await asyncio.sleep(0.005)


def connected(m: dict[str, Any]) -> bool:
    return bool(m["state"] == "connected")


async def send_lines(port: int, n: int, tag: bytes) -> float:
    """One device sends ``n`` lines of LINE bytes at once; the time it started."""
    body = b"".join(
        b"%s %09d " % (tag, i) + b"x" * (LINE - len(tag) - 12) + b"\n" for i in range(n)
    )
    loop = asyncio.get_running_loop()
    with socket.create_connection((HOST, port)) as sock:
        sock.setblocking(False)
        t0 = time.monotonic()
        await loop.sock_sendall(sock, body)
    return t0


# --- the measurements --------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        tmp: Path,
        P: Params,
        M: MqttParams,
        cores: tuple[int | None, int | None],
        profiler: Profiler | None = None,
    ):
        self.tmp, self.P, self.M, self.profiler = tmp, P, M, profiler
        self.relay_core, self.gen_core = cores
        self.runs = 0

    def relayd(self, extra: str) -> RelayProcess:
        self.runs += 1
        workdir = self.tmp / f"relayd-{self.runs}"
        workdir.mkdir()
        return RelayProcess(
            "relayd", self.relay_core, self.gen_core, workdir, self.P, RELAYD, extra_config=extra
        )

    async def publish(self, qos: int) -> dict[str, Any]:
        [bport] = free_ports(1)
        bdir = self.tmp / f"broker-publish{qos}"
        bdir.mkdir()
        n = self.M.publish_lines
        async with mosquitto(bdir, bport, self.gen_core):
            rp = self.relayd(mqtt_config(bport, qos))
            sub = Counter()
            try:
                r = await rp.start()
                await wait_mqtt(r, connected)
                await sub.start(bport, "bench/#", 0, self.gen_core)
                if self.profiler is not None:
                    await self.profiler.window_open(r, f"publish_qos{qos}", PROFILE_S)
                win = r.window()
                win.open()
                t0 = await send_lines(r.tcp_port, n, b"p")
                complete = await sub.wait_for(n, self.M.idle_s)
                win.close()
                seconds = (sub.last if complete else time.monotonic()) - t0
            finally:
                await sub.stop()
                await rp.stop()
        return {
            "scenario": f"publish_qos{qos}",
            "lines": n,
            "received": sub.n,
            "lost": n - sub.n,
            "lines_per_s": round(sub.n / seconds) if seconds > 0 else None,
            "relay_cpu_pct": round(win.relay_cpu_pct, 1),
            **win.noise(),
        }

    async def fanout50(self, uplink: bool) -> dict[str, Any]:
        [bport] = free_ports(1)
        bdir = self.tmp / f"broker-fanout-{self.runs}"
        bdir.mkdir()
        async with mosquitto(bdir, bport, self.gen_core):
            rp = self.relayd(mqtt_config(bport, 1) if uplink else "")
            try:
                r = await rp.start()
                if uplink:
                    await wait_mqtt(r, connected)
                hooks = Hooks(window_open=self.profiler.window_open if self.profiler else None)
                res = await fanout(
                    r, self.P, hooks, 50, name=f"fanout50_mqtt_{'on' if uplink else 'off'}"
                )
                if uplink:
                    res["mqtt_after"] = await mqtt_status(r)
            finally:
                await rp.stop()
        return {"scenario": f"fanout50_mqtt_{'on' if uplink else 'off'}", **res}

    async def spool(self) -> dict[str, Any]:
        [bport] = free_ports(1)
        bdir = self.tmp / "broker-spool"
        bdir.mkdir()
        n = self.M.spool_lines
        session = "bench-spool"
        async with mosquitto(bdir, bport, self.gen_core):
            await register_session(bport, "bench/#", session)
        rp = self.relayd(mqtt_config(bport, 1))
        sub = Counter()
        try:
            r = await rp.start()  # the broker is down: connecting
            t0 = await send_lines(r.tcp_port, n, b"s")
            t_spooled = await wait_mqtt(r, lambda m: m["spooled"] >= n, timeout=120.0)
            spool_dir = rp.workdir / "spool"
            spool_bytes = sum(f.stat().st_size for f in spool_dir.rglob("*") if f.is_file())
            async with mosquitto(bdir, bport, self.gen_core):
                await wait_mqtt(r, connected)
                t_back = time.monotonic()
                t_first = await wait_mqtt(r, lambda m: m["spooled"] < n, timeout=120.0)
                t_empty = await wait_mqtt(r, lambda m: m["spooled"] == 0, timeout=120.0)
                await sub.start(bport, "bench/#", 1, self.gen_core, session=session)
                await sub.wait_for(n, self.M.idle_s)
        finally:
            await sub.stop()
            await rp.stop()
        return {
            "scenario": "spool",
            "lines": n,
            "spool_bytes": spool_bytes,
            "write_per_s": round(n / (t_spooled - t0)),
            "replay_per_s": round(n / (t_empty - t_back)),
            "reconnect_to_first_ack_ms": round((t_first - t_back) * 1000),
            "received_after": sub.n,
            "lost": max(0, n - sub.n),
        }


# --- report ------------------------------------------------------------------------------


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, int | float) and b else None


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| measurement | value | target | met |", "|---|---|---|---|"]

    def row(what: str, value: Any, target: str, ok: bool | None) -> None:
        met = "" if ok is None else ("yes" if ok else "**no**")
        rows.append(f"| {what} | {value if value is not None else 'n/a'} | {target} | {met} |")

    for name, bound in TARGETS.items():
        res = results.get(name, {})
        rate = res.get("lines_per_s")
        row(
            f"{name}: lines/s (subscriber)",
            rate,
            f"≥ {bound:,}",
            None if rate is None else rate >= bound,
        )
        row(
            f"{name}: lost / relay CPU %",
            f"{res.get('lost')} / {res.get('relay_cpu_pct')}",
            "0",
            res.get("lost") == 0 if res else None,
        )
    off, on = results.get("fanout50_mqtt_off", {}), results.get("fanout50_mqtt_on", {})
    for key in ("p99_ms", "relay_cpu_pct"):
        r = ratio(on.get(key), off.get(key))
        row(
            f"fanout50 {key}: on / off",
            f"{r} ({on.get(key)} / {off.get(key)})",
            f"≤ {RATIO_TARGET}",
            None if r is None else r <= RATIO_TARGET,
        )
    sp = results.get("spool", {})
    row("spool write, lines/s (broker down)", sp.get("write_per_s"), "", None)
    row("spool replay, lines/s (broker back)", sp.get("replay_per_s"), "", None)
    row("spool: lost after replay", sp.get("lost"), "0", sp.get("lost") == 0 if sp else None)
    return "\n".join(rows)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result: each number the median of ``runs`` (the first run's for anything else)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, int | float) and all(isinstance(v, int | float) for v in values):
            out[key] = statistics.median(values)
    out["runs"] = [{k: r.get(k) for k in ("p50_ms", "p99_ms", "relay_cpu_pct")} for r in runs]
    return out


def write_markdown(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    body = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + body + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n## MQTT uplink (issue 15)\n\n" + body + "\n"
    path.write_text(new)


async def amain(args: argparse.Namespace) -> int:
    for tool in ("mosquitto", "mosquitto_sub", "stdbuf"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.mqtt: {tool} not found (Debian: mosquitto, mosquitto-clients)")
    P = override(Params().quick() if args.quick else Params(), args.set)
    M = MqttParams().quick() if args.quick else MqttParams()
    cores = sorted(os.sched_getaffinity(0))
    relay_core: int | None = cores[0] if len(cores) >= 2 else None
    gen_core: int | None = cores[-1] if len(cores) >= 2 else None
    if gen_core is not None:
        os.sched_setaffinity(0, {gen_core})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="relay-bench-mqtt-") as tmp:
        profiler = None
        if args.profile:
            profiler = Profiler(
                Path(args.profile), {"publish_qos0", "publish_qos1", "fanout50_mqtt_on"}
            )
        b = Bench(Path(tmp), P, M, (relay_core, gen_core), profiler)
        steps: dict[str, Callable[[], Any]] = {
            "publish_qos0": lambda: b.publish(0),
            "publish_qos1": lambda: b.publish(1),
            "fanout50_mqtt_off": lambda: b.fanout50(False),
            "fanout50_mqtt_on": lambda: b.fanout50(True),
            "spool": b.spool,
        }
        only = set(args.only.split(",")) if args.only else set(steps)
        if unknown := only - set(steps):
            raise SystemExit(f"bench.mqtt: --only: unknown {', '.join(sorted(unknown))}")
        runs: dict[str, list[dict[str, Any]]] = {}
        for i in range(args.repeat):  # off and on alternate: both see the same noise
            for name, step in steps.items():
                if name not in only or (i and not name.startswith("fanout50")):
                    continue
                try:
                    res = await asyncio.wait_for(step(), 600.0)
                except Exception as e:  # one broken measurement must not stop the others
                    res = {"scenario": name, "error": f"{type(e).__name__}: {e}"[:300]}
                runs.setdefault(name, []).append(res)
                print(json.dumps(res), flush=True)
        results = {name: median_of(rs) for name, rs in runs.items()}
        if profiler is not None:
            await profiler.finish()
    load_after = os.getloadavg()
    how = "one run"
    if args.repeat > 1:
        how = f"fanout50: medians of {args.repeat} runs, off and on alternating"
    text = (
        f"Generated by `make bench-mqtt` (`python -m bench.mqtt {' '.join(args.argv)}`), "
        f"{how}; relayd on core {relay_core}, Mosquitto, mosquitto_sub and the "
        f"generator on core {gen_core}. Load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in load_after)}.\n\n{table(results)}\n"
    )
    print("\n" + text)
    if args.markdown:
        write_markdown(Path(args.markdown), text)
        print(f"wrote {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mqtt", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small and short (smoke test)")
    ap.add_argument("--markdown", help="write the table into this file (between markers)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy relayd while it publishes")
    ap.add_argument("--rt", type=int, default=10, help="SCHED_FIFO priority (0: normal)")
    ap.add_argument("--only", help="these measurements only (comma-separated names)")
    ap.add_argument("--repeat", type=int, default=1, help="fanout50 off/on this many times")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    raise_nofile()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.rt:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt))
        except OSError as e:
            print(f"note: cannot use SCHED_FIFO ({e})", file=sys.stderr)
    if BENCH_SITE.is_dir():
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(amain(args))
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
