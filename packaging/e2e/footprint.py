"""Footprint of the installed relayd.service (issue 17): idle RSS, exec -> READY=1, relayctl.

Run by packaging/e2e/run.sh inside the booted Debian 13 machine, as root, with
the machine's own python3 (standard library only):

    footprint.py measure [--statuses N] [--max-rss-mb MB]
        relayd.service was just (re)started and has had no admin request and no
        scrape. Prints, and as one FOOTPRINT={json} line for `medians`:
        - idle RSS: VmRSS of MainPID once it has not changed for 0.5 s;
        - exec -> READY=1: systemd's own ExecMainStartTimestampMonotonic (the
          fork of the service process) -> ActiveEnterTimestampMonotonic (READY=1
          of a Type=notify-reload unit);
        - `relayctl status` wall time: N runs; the first (which makes relayd
          build its admin API) on its own, the median of the others.
        With --max-rss-mb, exit 1 when the idle RSS is above it (RSS is not a
        timing: the two times are reported, never judged here).
    footprint.py medians
        reads FOOTPRINT= lines (one per start) on stdin; prints the medians.
    footprint.py importtime [--top N]
        reads `python3 -X importtime` output on stdin; prints the self time per
        top-level package and the top modules by cumulative time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict

SETTLE_S = 0.5  # VmRSS unchanged for this long = idle
SETTLE_LIMIT_S = 20.0
MIB = 1024  # VmRSS is in KiB; figures are MiB ("MB" in bench/RESULTS.md)


def show(*props: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", "relayd", *(f"--property={p}" for p in props)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def vmrss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for PID {pid}")


def settled_rss_kib(pid: int) -> int:
    last, since = vmrss_kib(pid), time.monotonic()
    deadline = since + SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = vmrss_kib(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            return last
    raise RuntimeError(f"VmRSS of PID {pid} did not settle in {SETTLE_LIMIT_S:.0f} s")


def relayctl_status_s() -> float:
    t0 = time.perf_counter()
    subprocess.run(["relayctl", "status"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(statuses: int, max_rss_mb: float | None) -> int:
    props = show("MainPID", "ActiveState", "ExecMainStartTimestampMonotonic")
    pid = int(props["MainPID"])
    if props["ActiveState"] != "active" or pid == 0:
        sys.stderr.write(f"relayd.service is not running: {props}\n")
        return 1
    rss = settled_rss_kib(pid) / MIB
    ready = show("ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic", "MainPID")
    if ready["MainPID"] != str(pid):
        sys.stderr.write(f"relayd.service restarted while measured: {ready}\n")
        return 1
    ready_s = (
        int(ready["ActiveEnterTimestampMonotonic"]) - int(ready["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    times = [relayctl_status_s() for _ in range(statuses)]
    later = statistics.median(times[1:]) if len(times) > 1 else times[0]
    figures = {"rss_mb": rss, "ready_s": ready_s, "status_s": later, "first_status_s": times[0]}
    sys.stdout.write(
        f"idle RSS {rss:.1f} MB (PID {pid}; target 40)\n"
        f"exec -> READY=1 {ready_s:.3f} s (systemd's timestamps; target 0.5)\n"
        f"relayctl status {later:.3f} s (median of {max(1, statuses - 1)} after the first,"
        f" which took {times[0]:.3f} s; target 0.15)\n"
        f"FOOTPRINT={json.dumps(figures)}\n"
    )
    if max_rss_mb is not None and rss > max_rss_mb:
        sys.stdout.write(f"idle RSS {rss:.1f} MB is above the bound {max_rss_mb} MB\n")
        return 1
    return 0


def medians(text: str) -> int:
    runs = [json.loads(m[1]) for m in re.finditer(r"^FOOTPRINT=(\{.*\})$", text, re.M)]
    if not runs:
        sys.stderr.write("no FOOTPRINT= lines\n")
        return 1

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    sys.stdout.write(
        f"medians of {len(runs)} starts of relayd.service:\n"
        f"  idle RSS        {med('rss_mb'):6.1f} MB  (target 40; each: "
        + ", ".join(f"{r['rss_mb']:.1f}" for r in runs)
        + ")\n"
        f"  exec -> READY=1 {med('ready_s'):6.3f} s   (target 0.5; each: "
        + ", ".join(f"{r['ready_s']:.3f}" for r in runs)
        + ")\n"
        f"  relayctl status {med('status_s'):6.3f} s   (target 0.15)\n"
        f"  first relayctl status after a start {med('first_status_s'):.3f} s\n"
    )
    return 0


LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def importtime(text: str, top: int) -> int:
    per_package: dict[str, float] = defaultdict(float)
    modules: list[tuple[str, float]] = []
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            per_package[m[4].split(".")[0]] += int(m[1]) / 1000
            modules.append((m[4], int(m[2]) / 1000))
    if not modules:
        sys.stderr.write("no `import time:` lines\n")
        return 1
    packages = sorted(per_package.items(), key=lambda kv: -kv[1])
    modules.sort(key=lambda kv: -kv[1])
    total = sum(per_package.values())
    sys.stdout.write(f"{total:.0f} ms of imports; self ms per package | cumulative ms per module\n")
    for i in range(top):
        p = packages[i] if i < len(packages) else ("", 0.0)
        c = modules[i] if i < len(modules) else ("", 0.0)
        sys.stdout.write(f"  {p[0]:<20} {p[1]:6.0f}  | {c[0]:<36} {c[1]:6.0f}\n")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--statuses", type=int, default=5)
    m.add_argument("--max-rss-mb", type=float)
    sub.add_parser("medians")
    i = sub.add_parser("importtime")
    i.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure(args.statuses, args.max_rss_mb)
    if args.command == "medians":
        return medians(sys.stdin.read())
    return importtime(sys.stdin.read(), args.top)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
