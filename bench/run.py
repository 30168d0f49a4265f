"""Run the scenarios against relayd and the two reference relays, side by side.

    .venv/bin/python -m bench.run [--quick] [--relays relayd,naive,floor]
        [--scenarios throughput,fanout50,fanout200,slow,idle,drain,fanout50_wss,downlink50,...]
        [--repeat 3] [--set fanout_s=5 ...] [--relayd-v1 /other/checkout/.venv/bin/python]
        [--markdown bench/RESULTS.md] [--profile DIR] [--rt PRIO | --rt 0 --nice N]

Each relay runs as its own process pinned to one core (taskset), a fresh one
for every scenario run; this generator pins itself to the other core. Both run
under SCHED_FIFO by default, since the machine may be shared (see RESULTS.md).
Every run prints one JSON line and a short table; the end prints medians of the
repeats and the ratios relayd/naive and relayd/floor, and checks issue 6's
targets. With --quick the scenarios are small (fan-out 10 and 40 clients, 100
idle connections of each kind) and short: about a minute for all three relays.

--relayd-v1 adds a fourth relay, "relayd-v1": the relayd of another checkout (its
venv's interpreter), configured like relayd, so that an older relayd and this one
are measured in the same run (the ratio column relayd/relayd-v1). The scenarios
of issues 11 and 16 (fanout50_wss, connect_none, connect_token, fanout50_pages)
run on relayd only; a second table compares them with their plain counterparts.

Issue 17: relay "nodered" is Node-RED with bench/node-red-flow.json (tcp in ->
websocket out; bench/nodered.py), in the default set once `make bench-deps`
installed it; scenario "payload" checks that every relay's frames carry the same
lines. fanout1000, fanout5000 and idle10k (bench/scale.py) run on relayd only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parent.parent
# Bench-only deps (uvloop, py-spy) live here, off relayd's import path (see bench.mk).
BENCH_SITE = ROOT / ".venv" / "bench-site"
if BENCH_SITE.is_dir():
    sys.path.insert(0, str(BENCH_SITE))

from bench import nodered  # noqa: E402
from bench.downlink import downlink50, downlink_cost  # noqa: E402
from bench.procstat import uses_uvloop  # noqa: E402
from bench.scale import SCALE  # noqa: E402
from bench.scale import SCENARIOS as SCALE_SCENARIOS  # noqa: E402
from bench.scenarios import (  # noqa: E402
    RELAYD_ONLY,
    SCENARIOS,
    SETUP,
    Hooks,
    Params,
    Relay,
)

SCENARIOS["downlink50"] = downlink50  # issue 12; relayd only (`--relays relayd`)
SCENARIOS.update(SCALE_SCENARIOS)  # issue 17: fanout1000, fanout5000, idle10k
RELAYD_ONLY = RELAYD_ONLY | SCALE
SCENARIOS["payload"] = nodered.same_payload  # issue 17: do the relays' frames compare?
SCENARIOS["downlink_cost"] = downlink_cost  # issue 12: relayd's CPU per command, no uplink

RELAYS = ("relayd", "naive", "floor")
# issue 17: Node-RED (bench/nodered.py), in the default set once `make bench-deps` installed it
NODERED = nodered.NODERED
DEFAULT_RELAYS = (*RELAYS, NODERED) if nodered.installed() else RELAYS
# Not run by default: relayd with [relay] history = 0, for the cost of history
# (`--relays relayd,relayd-h0 --scenarios fanout50`: the relayd/relayd-h0 column).
RELAYD_H0 = "relayd-h0"
RELAYD_V1 = "relayd-v1"  # only with --relayd-v1
# BENCH_V1_V2=1: the --relayd-v1 checkout is a v2 relayd (an earlier commit of this
# one): configured like relayd and run in the relayd-only scenarios too, so that a
# change's before/after is measured in one run (bench/RESULTS.md, Downlink).
V1_IS_V2 = os.environ.get("BENCH_V1_V2") == "1"
V1_RELAYD_ONLY = (RELAYD_V1,) if V1_IS_V2 else ()
HOST = "127.0.0.1"

# (metric, how to read "better", target check on relayd's median or None)
Check = Callable[[dict[str, dict[str, Any]]], bool | None]


def _get(m: dict[str, dict[str, Any]], relay: str, key: str) -> Any:
    return m.get(relay, {}).get(key)


def _le(key: str, bound: float) -> Check:
    def check(m: dict[str, dict[str, Any]]) -> bool | None:
        v = _get(m, "relayd", key)
        return None if v is None else v <= bound

    return check


def _ge(key: str, bound: float) -> Check:
    def check(m: dict[str, dict[str, Any]]) -> bool | None:
        v = _get(m, "relayd", key)
        return None if v is None else v >= bound

    return check


def _cpu_check(m: dict[str, dict[str, Any]]) -> bool | None:
    v, naive, floor = (_get(m, r, "relay_cpu_pct") for r in RELAYS)
    if v is None or naive is None or floor is None:
        return None
    return bool(v <= naive and v <= 1.4 * floor)


def _true(key: str) -> Check:
    def check(m: dict[str, dict[str, Any]]) -> bool | None:
        v = _get(m, "relayd", key)
        return None if v is None else bool(v)

    return check


REPORT: dict[str, list[tuple[str, str, Check | None]]] = {
    "throughput": [
        ("lines_per_s", "≥ 250,000", _ge("lines_per_s", 250_000)),
        ("lost", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("p50_ms", "", None),
        ("rss_max_kib", "", None),
    ],
    "fanout50": [
        ("delivered_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p50_ms", "", None),
        ("p99_ms", "≤ 5", _le("p99_ms", 5.0)),
        ("max_ms", "", None),
        ("relay_cpu_pct", "≤ naive, ≤ 1.4 × floor", _cpu_check),
        ("gen_cpu_pct", "", None),
        ("rss_max_kib", "", None),
    ],
    "fanout200": [
        ("delivered_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p50_ms", "", None),
        ("p99_ms", "≤ 30", _le("p99_ms", 30.0)),
        ("max_ms", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("rss_max_kib", "", None),
    ],
    "recover50": [
        ("recover_gap_ms", "≤ 10", _le("recover_gap_ms", 10.0)),
        ("recover_replayed", "1000", None),
        ("recovered", "", None),
        ("recover_replay_ms", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p99_ms", "", None),
        ("relay_cpu_pct", "", None),
    ],
    "downlink_cost": [
        ("relay_cpu_us_per_command", "", None),
        ("relay_sys_us_per_command", "", None),
        ("commands_sent", "", None),
        ("command_errors", "0", _le("command_errors", 0)),
        ("cmd_p50_ms", "", None),
        ("cmd_p99_ms", "", None),
        ("ack_p99_ms", "", None),
    ],
    "downlink50": [
        ("cmd_p99_ms", "≤ 5", _le("cmd_p99_ms", 5.0)),
        ("uplink_p99_ratio", "≤ 1.2", _le("uplink_p99_ratio", 1.2)),
        ("uplink_p99_base_ms", "", None),
        ("p99_ms", "", None),
        ("cmd_p50_ms", "", None),
        ("cmd_max_ms", "", None),
        ("ack_p50_ms", "", None),
        ("ack_p99_ms", "", None),
        ("commands_sent", "", None),
        ("command_errors", "0", _le("command_errors", 0)),
        ("commands_unanswered", "0", _le("commands_unanswered", 0)),
        ("device_reads", "", None),
        ("device_reads_expected", "", None),
        ("lost", "0", _le("lost", 0)),
        ("relay_cpu_pct", "", None),
        ("relay_cpu_pct_base", "", None),
        ("gen_cpu_pct", "", None),
        ("gen_core_other_pct", "", None),
    ],
    "slow": [
        ("healthy_ratio", "≥ 0.99", _ge("healthy_ratio", 0.99)),
        ("p99_base_ms", "", None),
        ("p99_slow_ms", "", None),
        ("p99_ratio", "≤ 1.5", _le("p99_ratio", 1.5)),
        ("healthy_lost", "", None),
        ("rss_growth_kib", "", None),
        (
            "rss_growth_2nd_half_kib",
            "≤ 1024 (flat once full)",
            _le("rss_growth_2nd_half_kib", 1024),
        ),
    ],
    "idle": [
        ("kib_per_client", "≤ 12", _le("kib_per_client", 12.0)),
        ("kib_per_device", "≤ 4", _le("kib_per_device", 4.0)),
        ("rss_base_kib", "", None),
    ],
    "fanout50_wss": [
        ("delivered_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p50_ms", "", None),
        ("p99_ms", "", None),
        ("max_ms", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("rss_max_kib", "", None),
    ],
    "fanout50_pages": [
        ("delivered_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("page_frames_per_s", "", None),
        ("status_gets_per_s", "", None),
        ("status_errors", "0", _le("status_errors", 0)),
        ("p99_ms", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
    ],
    "connect_none": [
        ("connects_per_s", "", None),
        ("relay_cpu_ms_per_connect", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
    ],
    "connect_token": [
        ("connects_per_s", "", None),
        ("relay_cpu_ms_per_connect", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("anonymous_refused", "yes", _true("anonymous_refused")),
    ],
    "payload": [
        ("frames_match", "yes", _true("frames_match")),
        ("frames_seen", "6", None),
        ("first_difference", "", None),
    ],
    "fanout1000": [
        ("delivered_per_s", "", None),
        ("expected_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p50_ms", "", None),
        ("p99_ms", "≤ 20", _le("p99_ms", 20.0)),
        ("max_ms", "", None),
        ("lines_per_frame", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("rss_max_kib", "", None),
    ],
    "fanout5000": [
        ("delivered_per_s", "", None),
        ("expected_per_s", "", None),
        ("lost", "0", _le("lost", 0)),
        ("p50_ms", "", None),
        ("p99_ms", "≤ 50", _le("p99_ms", 50.0)),
        ("max_ms", "", None),
        ("connects_per_s", "", None),
        ("lines_per_frame", "", None),
        ("relay_cpu_pct", "", None),
        ("gen_cpu_pct", "", None),
        ("rss_max_kib", "", None),
    ],
    "idle10k": [
        ("kib_per_client", "≤ 8", _le("kib_per_client", 8.0)),
        ("rss_total_mib", "", None),
        ("clients_alive", "", None),
        ("connects_per_s", "", None),
        ("metrics_ms", "", None),
        ("metrics_bytes", "", None),
        ("ports_list_s", "", None),
    ],
    "drain": [
        ("share_min", "1.0", _ge("share_min", 1.0)),
        ("close_1001", "all clients", _true("close_1001")),
        ("exit_s", "≤ drain.timeout + 3", _le("exit_s", 8.0)),
        ("after_share_min", "", None),
    ],
}


# relayd against itself: (label, scenario, baseline scenario, metric, target, op, bound).
# Both scenarios run in the same bench run; see compare_table.
COMPARE: list[tuple[str, str, str, str, str, str, float]] = [
    ("wss/ws CPU (issue 11)", "fanout50_wss", "fanout50", "relay_cpu_pct", "≤ 1.6", "le", 1.6),
    ("wss/ws p99 (issue 11)", "fanout50_wss", "fanout50", "p99_ms", "≤ 1.5", "le", 1.5),
    ("wss/ws p50", "fanout50_wss", "fanout50", "p50_ms", "", "", 0.0),
    (
        "token/none connect rate (issue 11)",
        "connect_token",
        "connect_none",
        "connects_per_s",
        "≥ 0.8",
        "ge",
        0.8,
    ),
    (
        "token/none CPU per connect",
        "connect_token",
        "connect_none",
        "relay_cpu_ms_per_connect",
        "",
        "",
        0.0,
    ),
    (
        "10 pages/none CPU (issue 16)",
        "fanout50_pages",
        "fanout50",
        "relay_cpu_pct",
        "≤ 1.1",
        "le",
        1.1,
    ),
    ("10 pages/none p99", "fanout50_pages", "fanout50", "p99_ms", "", "", 0.0),
]


def compare_table(results: list[dict[str, Any]]) -> str:
    """COMPARE as a table: per run, relayd's scenario over its baseline; the median of those.

    Pairing the runs (run k of one against run k of the other, minutes apart at
    most) keeps slow drifts of a shared machine out of the ratio.
    """
    by: dict[tuple[str, int], dict[str, Any]] = {
        (r["scenario"], r["run"]): r for r in results if r["relay"] == "relayd" and "error" not in r
    }
    lines = [
        "| comparison | metric | scenario | baseline | ratio per run | median | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, scen, base, key, target, op, bound in COMPARE:
        ratios = []
        for (s, run), res in sorted(by.items()):
            other = by.get((base, run))
            if s != scen or other is None:
                continue
            a, b = res.get(key), other.get(key)
            if isinstance(a, int | float) and isinstance(b, int | float) and b:
                ratios.append(a / b)
        if not ratios:
            continue
        med = statistics.median(ratios)
        met = ""
        if op:
            met = "✅" if (med <= bound if op == "le" else med >= bound) else "❌"
        each = ", ".join(f"{x:.2f}" for x in ratios)
        lines.append(
            f"| {label} | {key} | {scen} | {base} | {each} | {med:.2f} | {target} | {met} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


# -- starting relays ------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Tls:
    """A self-signed certificate for 127.0.0.1 and the clients' context trusting it."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={HOST}",
                "-addext",
                f"subjectAltName=IP:{HOST}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cls(cert, key)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def relayd_config(
    path: Path,
    ws_port: int,
    tcp_port: int,
    drain_timeout: float,
    tls: Tls | None = None,
    auth: str | None = None,
    history: int | None = 1000,
    extra: str = "",
) -> None:
    """relayd's config; ``history=None``: a relayd before v2 (relayd-v1), no v2 keys.

    ``extra``: more tables, appended (bench/mqtt.py's [mqtt]).
    """
    tls_lines = f'tls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n' if tls else ""
    auth_lines = f'[auth]\nmode = "{auth}"\n\n' if auth else ""
    v2 = history is not None
    history_line = f"history = {history}\n" if v2 else ""
    downlink_line = "downlink = true\n" if v2 else ""
    commands = ""
    if v2:  # no devices: downlink50's command clients subscribe to it
        [commands_port] = free_ports(1)
        commands = f'\n[[ports]]\nport = {commands_port}\nhost = "{HOST}"\nname = "commands"\n'
    path.write_text(
        f"""{auth_lines}[http]
host = "{HOST}"
port = {ws_port}
{tls_lines}
[relay]
queue_size = 1024
slow_client = "drop"
max_clients = 12000
per_message_deflate = false
{history_line}
[drain]
timeout = {drain_timeout}

[[ports]]
port = {tcp_port}
host = "{HOST}"
framing = "lines"
max_connections = 5000
{downlink_line}{commands}{extra}"""
    )


def relay_command(
    name: str,
    workdir: Path,
    ws_port: int,
    tcp_port: int,
    P: Params,
    exe: Path | None = None,
    tls: Tls | None = None,
    auth: str | None = None,
    extra: str = "",
) -> list[str]:
    if exe is not None:  # a relayd (this checkout's, or another's)
        cfg = workdir / "relayd.toml"
        # relayd-v1 predates the v2 keys; relayd-h0 measures relayd without history.
        history = None if name == RELAYD_V1 and not V1_IS_V2 else 0 if name == RELAYD_H0 else 1000
        relayd_config(cfg, ws_port, tcp_port, P.drain_timeout, tls, auth, history, extra)
        return [
            str(exe),
            "--config",
            str(cfg),
            "--admin-socket",
            str(workdir / "admin.sock"),
            "--state-dir",
            str(workdir),
        ]
    script = ROOT / "bench" / "reference" / f"{name}.py"
    return [
        sys.executable,
        str(script),
        "--host",
        HOST,
        "--ws-port",
        str(ws_port),
        "--tcp-port",
        str(tcp_port),
        "--drain-timeout",
        str(P.drain_timeout),
    ]


def open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # handed to the child; the caller closes it


def append_jsonl(path: Path, res: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(res) + "\n")


class RelayProcess:
    def __init__(
        self,
        name: str,
        core: int | None,
        gen_core: int | None,
        workdir: Path,
        P: Params,
        exe: Path | None = None,
        tls: Tls | None = None,
        auth: str | None = None,
        extra_config: str = "",
        spare_cores: tuple[int, ...] = (),
    ) -> None:
        self.extra_config = extra_config  # relayd only: appended to its config
        self.spare_cores = spare_cores
        self.name, self.core, self.gen_core, self.workdir, self.P = name, core, gen_core, workdir, P
        self.exe, self.tls, self.auth = exe, tls, auth
        self.log = workdir / f"{name}.log"
        self.relay: Relay | None = None

    async def start(self, timeout: float = 30.0) -> Relay:
        ws_port, tcp_port = free_ports(2)
        extra_env: dict[str, str] = {}
        if self.name == NODERED:
            cmd, extra_env = nodered.command(self.workdir, HOST, ws_port, tcp_port)
        else:
            cmd = relay_command(
                self.name,
                self.workdir,
                ws_port,
                tcp_port,
                self.P,
                self.exe,
                self.tls,
                self.auth,
                self.extra_config,
            )
        if self.core is not None:
            cmd = ["taskset", "-c", str(self.core), *cmd]
        if self.name == NODERED and os.sched_getscheduler(0) == os.SCHED_FIFO:
            # Node's helper threads share the core: under SCHED_FIFO its main thread
            # spins waiting for them and never yields (it never starts). Round-robin,
            # same priority, lets them take turns.
            cmd = ["chrt", "-r", str(os.sched_getparam(0).sched_priority), *cmd]
        notify_path = self.workdir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **extra_env}
        env.pop("WATCHDOG_USEC", None)
        loop = asyncio.get_running_loop()
        log = open_log(self.log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        finally:
            log.close()
        self.relay = Relay(
            self.name,
            proc,
            HOST,
            ws_port,
            tcp_port,
            self.core,
            self.gen_core,
            tls=self.tls.client_context() if self.tls else None,
            admin_socket=str(self.workdir / "admin.sock") if self.exe else None,
            spare_cores=self.spare_cores,
        )
        try:
            if self.name == NODERED:  # no READY=1: ready once its ports accept
                await nodered.wait_ready(proc, HOST, [tcp_port, ws_port], timeout)
                return self.relay
            exited = loop.create_task(proc.wait())
            deadline = loop.time() + timeout
            for _ in range(1000):  # datagrams until READY=1
                recv = loop.create_task(loop.sock_recv(sock, 4096))
                done, _ = await asyncio.wait(
                    {recv, exited},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if recv not in done:
                    recv.cancel()
                    if exited in done:
                        raise RuntimeError(f"{self.name} exited with {proc.returncode} at start")
                    raise RuntimeError(f"{self.name}: no READY=1 within {timeout} s")
                if b"READY=1" in recv.result():
                    exited.cancel()
                    return self.relay
            raise RuntimeError(f"{self.name}: no READY=1")
        except BaseException:
            await self.stop()
            raise
        finally:
            sock.close()

    async def stop(self) -> int | None:
        if self.relay is None:
            return None
        proc = self.relay.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode


async def wakeup_lateness(cores: list[int], seconds: float = 3.0) -> str:
    """bench/jitter.py on each core at once: the machine's floor under the latencies."""
    if not cores:
        return "wake-up lateness: not measured (relay and generator share one core)"
    procs = [
        await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            str(core),
            sys.executable,
            "-m",
            "bench.jitter",
            str(seconds),
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for core in cores
    ]
    parts = []
    for core, proc in zip(cores, procs, strict=True):
        out, _ = await proc.communicate()
        try:
            j = json.loads(out)
        except ValueError:
            parts.append(f"core {core}: not measured (exit {proc.returncode})")
            continue
        parts.append(
            f"core {core} p50 {j['p50_ms']:.3f}, p99 {j['p99_ms']:.3f}, "
            f"p99.9 {j['p999_ms']:.3f}, max {j['max_ms']:.3f} ms"
        )
    return (
        f"wake-up lateness of a 1 ms timer, {seconds:g} s before the scenarios "
        f"(bench/jitter.py): {'; '.join(parts)}"
    )


# -- profiling ---------------------------------------------------------------------


def pyspy_path() -> str | None:
    for p in (BENCH_SITE / "bin" / "py-spy", ROOT / ".venv" / "bin" / "py-spy"):
        if p.exists():
            return str(p)
    return shutil.which("py-spy")


class Profiler:
    """py-spy record of relayd during a scenario's measurement window."""

    def __init__(self, outdir: Path, scenarios: set[str]) -> None:
        self.outdir, self.scenarios = outdir, scenarios
        self.procs: list[tuple[asyncio.subprocess.Process, Path]] = []
        self.exe = pyspy_path()

    async def window_open(self, relay: Relay, scenario: str, seconds: float) -> None:
        if relay.name not in ("relayd", RELAYD_V1):
            return
        if scenario not in self.scenarios or self.exe is None:
            return
        stem = scenario if relay.name == "relayd" else f"{scenario}.{relay.name}"
        if any(path.stem == stem for _, path in self.procs):
            return  # once per scenario and relay
        out = self.outdir / f"{stem}.txt"
        # Under SCHED_FIFO, sample from a higher priority so the profiler is not starved.
        prio = os.sched_getparam(0).sched_priority
        chrt = ["chrt", "-f", str(prio + 1)] if prio else []
        proc = await asyncio.create_subprocess_exec(
            *chrt,
            self.exe,
            "record",
            "--pid",
            str(relay.pid),
            "--rate",
            "200",
            "--duration",
            str(max(1, int(seconds))),
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append((proc, out))

    async def worker_open(self, pid: int, stem: str, seconds: float) -> None:
        """py-spy of a generator process (bench/scale.py) during the window."""
        if stem.split(".")[0] not in self.scenarios or self.exe is None:
            return
        out = self.outdir / f"{stem}.txt"
        prio = os.sched_getparam(0).sched_priority  # above the generator, as for relayd
        chrt = ["chrt", "-f", str(prio + 1)] if prio else []
        proc = await asyncio.create_subprocess_exec(
            *chrt,
            self.exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--duration",
            str(max(1, int(seconds))),
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append((proc, out))

    async def finish(self) -> None:
        for proc, out in self.procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30.0)
            if out.exists():
                summary = summarize_profile(out)
                out.with_suffix(".summary.txt").write_text(summary)
                print(f"\n## profile {out.stem} (py-spy)\n{summary}")


def summarize_profile(path: Path, top: int = 20) -> str:
    """Self and inclusive shares of the hottest functions in a py-spy raw file."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return "(no samples)\n"
    out = [f"{total} samples", "self %  function"]
    for f, c in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * c / total:6.1f}  {f}")
    out.append("incl %  function")
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[: top * 2]:
        out.append(f"{100 * c / total:6.1f}  {f}")
    return "\n".join(out) + "\n"


# -- reporting --------------------------------------------------------------------


def short_table(res: dict[str, Any]) -> str:
    keys = [k for k, _, _ in REPORT.get(res["scenario"], [])]
    cells = [f"{k}={res.get(k)}" for k in keys if k in res]
    return f"  {res['scenario']:<10} {res['relay']:<7} run {res['run']}: " + "  ".join(cells)


def medians(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> relay -> metric -> median over the runs (numbers) or the last value."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["scenario"], r["relay"]), []).append(r)
    for (scen, relay), runs in groups.items():
        m: dict[str, Any] = {"runs": len(runs)}
        for key in runs[-1]:
            vals = [r.get(key) for r in runs]
            nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
            if nums and len(nums) == len(vals):
                m[key] = statistics.median(nums)
            elif all(isinstance(v, bool) for v in vals):
                m[key] = all(vals)
            else:
                m[key] = vals[-1]
        out.setdefault(scen, {})[relay] = m
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    if isinstance(a, bool) or isinstance(b, bool):
        return ""
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return f"{a / b:.2f}"
    return ""


def summary_table(med: dict[str, dict[str, dict[str, Any]]], relays: list[str]) -> str:
    head = ["scenario", "metric", *relays]
    if "relayd" in relays:
        head += [f"relayd/{r}" for r in relays if r != "relayd"]
        head += ["target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scen, rows in REPORT.items():
        if scen not in med:
            continue
        for key, target, check in rows:
            cells = [scen, key] + [_fmt(_get(med[scen], r, key)) for r in relays]
            if "relayd" in relays:
                a = _get(med[scen], "relayd", key)
                cells += [_ratio(a, _get(med[scen], r, key)) for r in relays if r != "relayd"]
                met = check(med[scen]) if check else None
                cells += [target, "" if met is None else ("✅" if met else "❌")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relayd_version(exe: Path) -> str:
    try:
        v = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
        return (v.stdout or v.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"unavailable ({e})"


def machine_info(relays: list[str], v1: Path | None = None) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for pkg in ("websockets", "uvicorn", "starlette", "fastapi", "uvloop", "py-spy"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    if "relayd" in relays:
        info["relayd"] = relayd_version(ROOT / ".venv" / "bin" / "relayd")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            rev = subprocess.run(
                ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            if rev:
                info["relayd"] += f" (git {rev})"
    if v1 is not None and RELAYD_V1 in relays:
        info[RELAYD_V1] = f"{relayd_version(v1)} ({v1})"
    return info


def write_markdown(
    path: Path,
    info: dict[str, str],
    table: str,
    args: argparse.Namespace,
    loops: dict[str, bool],
    compare: str = "",
    load: str = "",
) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    loop_note = ", ".join(f"{r}: {'uvloop' if u else 'asyncio'}" for r, u in loops.items())
    body = (
        f"{begin}\n"
        f"Generated by `make bench` (`python -m bench.run {' '.join(args.argv)}`); "
        f"medians of {args.repeat} run{'s' if args.repeat != 1 else ''}.\n\n"
        f"Machine:\n{machine}\n"
        f"- event loop seen in each relay: {loop_note}\n"
        f"{load}\n"
        f"{table}\n"
        + (
            f"\nrelayd against itself (run k against run k, then the median):\n\n{compare}\n"
            if compare
            else ""
        )
        + f"{end}"
    )
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + body + old[old.index(end) + len(end) :]
    else:
        new = "# Benchmark results (issue 6)\n\n" + body + "\n" + old
    path.write_text(new)


# -- main ---------------------------------------------------------------------------------


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def amain(args: argparse.Namespace) -> int:
    P = Params().quick() if args.quick else Params()
    P = override(P, args.set)
    relays = args.relays.split(",")
    scenarios = args.scenarios.split(",")
    v1 = Path(args.relayd_v1).parent / "relayd" if args.relayd_v1 else None
    if v1 is not None and RELAYD_V1 not in relays:
        relays.insert(relays.index("relayd") + 1 if "relayd" in relays else 0, RELAYD_V1)
    exes: dict[str, Path] = {
        "relayd": ROOT / ".venv" / "bin" / "relayd",
        RELAYD_H0: ROOT / ".venv" / "bin" / "relayd",
    }
    if v1 is not None:
        exes[RELAYD_V1] = v1
    for name in relays:
        if name not in RELAYS and name not in exes and name != NODERED:
            raise SystemExit(f"unknown relay {name!r} (relayd-v1 needs --relayd-v1)")
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}")
    cores = sorted(os.sched_getaffinity(0))
    relay_core: int | None = cores[0]
    gen_core: int | None = cores[-1]
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[-1]})
    else:
        relay_core = gen_core = None
        print("warning: one core only; relay and generator share it", file=sys.stderr)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    jsonl = ROOT / "bench" / "results" / f"{stamp}.jsonl"
    profiler = None
    if args.profile:
        profiler = Profiler(Path(args.profile), set(scenarios))  # those with a window
    hooks = Hooks(
        window_open=profiler.window_open if profiler else None,
        worker_open=profiler.worker_open if profiler else None,
    )

    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    sched = f"SCHED_FIFO {args.rt}" if args.rt else f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"
    print(f"# generator on core {gen_core} ({loop_name}); relays on core {relay_core}; {sched}")
    results: list[dict[str, Any]] = []
    loops: dict[str, bool] = {}
    load_before = os.getloadavg()
    floor = await wakeup_lateness([c for c in (relay_core, gen_core) if c is not None])
    print(f"# {floor}")
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        tls = None
        if any(SETUP.get(s, {}).get("tls") for s in scenarios):
            tls = Tls.make(Path(tmp))
        for run in range(1, args.repeat + 1):
            for scen in scenarios:
                for name in relays:
                    if scen in RELAYD_ONLY and name not in ("relayd", *V1_RELAYD_ONLY):
                        continue
                    workdir = Path(tmp) / f"{name}-{scen}-{run}"
                    workdir.mkdir()
                    setup = SETUP.get(scen, {})
                    rp = RelayProcess(
                        name,
                        relay_core,
                        gen_core,
                        workdir,
                        P,
                        exe=exes.get(name),
                        tls=tls if setup.get("tls") else None,
                        auth=setup.get("auth"),
                        spare_cores=tuple(c for c in cores if c not in (relay_core, gen_core)),
                    )
                    res: dict[str, Any] = {"scenario": scen, "relay": name, "run": run}
                    try:
                        relay = await rp.start()
                        loops[name] = uses_uvloop(relay.pid)
                        limit = 600.0
                        res.update(await asyncio.wait_for(SCENARIOS[scen](relay, P, hooks), limit))
                    except Exception as e:  # a broken relay must not stop the others
                        res["error"] = f"{type(e).__name__}: {e}"
                    finally:
                        rc = await rp.stop()
                        if scen != "drain":
                            res["stop_rc"] = rc
                    if "error" in res and rp.log.exists():
                        tail = rp.log.read_text(errors="replace").strip().splitlines()[-5:]
                        res["log_tail"] = tail
                    results.append(res)
                    print(json.dumps(res), flush=True)
                    print(short_table(res) if "error" not in res else f"  ERROR {res['error']}")
                    append_jsonl(jsonl, res)
    if profiler is not None:
        await profiler.finish()
    load_after = os.getloadavg()

    med = medians(results)
    table = summary_table(med, relays)
    compare = compare_table(results)
    load = (
        f"- load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}\n- {floor}\n"
    )
    print(f"\n## medians of {args.repeat} run(s)\n")
    print(load)
    print(table)
    if compare:
        print(f"\n## relayd against itself\n\n{compare}")
    print(f"\nraw results: {jsonl}")
    if args.markdown:
        info = machine_info(relays, v1)
        write_markdown(Path(args.markdown), info, table, args, loops, compare, load)
        print(f"wrote {args.markdown}")
    return 0


def override(P: Params, settings: list[str]) -> Params:
    """Params with `key=value` settings applied (--set fanout_s=5)."""
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(P)}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, KEY one of {sorted(fields)}")
        current = getattr(P, key)
        if isinstance(current, tuple):
            changes[key] = tuple(type(current[0])(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(P, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes (smoke test)")
    ap.add_argument("--relays", default=",".join(DEFAULT_RELAYS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--repeat", type=int, default=None, help="runs per scenario (3; --quick: 1)")
    ap.add_argument("--markdown", help="write the results table into this file (between markers)")
    ap.add_argument(
        "--profile", help="py-spy relayd (and relayd-v1) during throughput/fan-out into this dir"
    )
    ap.add_argument(
        "--rt",
        type=int,
        default=10,
        help="SCHED_FIFO priority of the runner and relays (0: normal scheduling)",
    )
    ap.add_argument("--nice", type=int, default=-10, help="niceness without --rt (0: leave)")
    ap.add_argument("--no-uvloop", action="store_true", help="run the generator on asyncio")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario parameter (bench/scenarios.py Params), e.g. fanout_s=5",
    )
    ap.add_argument(
        "--relayd-v1",
        metavar="PYTHON",
        help="also run the relayd of another checkout (its venv's python) as relay relayd-v1",
    )
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    raise_nofile()
    # The machine is shared: keep other processes from preempting the relay and the
    # generator (children inherit the policy through taskset's exec).
    if args.rt:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt))
        except OSError as e:
            print(f"note: cannot use SCHED_FIFO ({e}); using nice", file=sys.stderr)
            args.rt = 0
    if not args.rt and args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as e:
            print(f"note: cannot renice to {args.nice} ({e})", file=sys.stderr)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            print("note: uvloop not found, the generator runs on asyncio", file=sys.stderr)
        else:
            return uvloop.run(amain(args))
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
