"""What a relay costs, read from the outside: /proc/<pid>/stat, status and fd."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may contain spaces; fields restart after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def uses_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension mapped (i.e. imported it)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"uvloop" in f.read()
    except OSError:
        return False


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) clock ticks from /proc/stat; busy includes steal."""
    out = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                idle = v[3] + v[4]
                out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def self_cpu_seconds() -> float:
    """CPU of this process and of its reaped children (the generator's own cost)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


@dataclass
class Sample:
    t: float
    cpu: float
    rss: int


@dataclass
class Sampler:
    """Samples a relay's CPU and RSS every `interval` s until stopped."""

    pid: int
    interval: float = 0.25
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def sample(self) -> Sample:
        s = Sample(time.monotonic(), cpu_seconds(self.pid), rss_kib(self.pid))
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        # Bounded by the caller's stop(); also bounded in count as a safety net.
        for _ in range(100_000):
            try:
                self.sample()
            except OSError:  # the process is gone (drain)
                return
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
                return
            except TimeoutError:
                pass

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def rss_max(self) -> int:
        return max((s.rss for s in self.samples), default=0)


@dataclass
class Window:
    """CPU of the relay and of the generator between two points in time."""

    pid: int
    t0: float = 0.0
    relay0: float = 0.0
    gen0: float = 0.0
    seconds: float = 0.0
    relay_cpu_pct: float = 0.0
    gen_cpu_pct: float = 0.0
    extra_pids: list[int] = field(default_factory=list)
    relay_core: int | None = None
    gen_core: int | None = None
    # share of each core used by everything else (other processes, steal)
    relay_core_other_pct: float | None = None
    gen_core_other_pct: float | None = None
    _extra0: float = 0.0
    _cores0: dict[int, tuple[int, int]] = field(default_factory=dict)

    def _extra(self) -> float:
        total = 0.0
        for p in self.extra_pids:
            try:
                total += cpu_seconds(p)
            except OSError:
                pass
        return total

    def open(self) -> None:
        self.t0 = time.monotonic()
        self.relay0 = cpu_seconds(self.pid)
        self.gen0 = self_cpu_seconds()
        self._extra0 = self._extra()
        self._cores0 = core_ticks()

    def close(self) -> None:
        self.seconds = time.monotonic() - self.t0
        relay = cpu_seconds(self.pid) - self.relay0
        gen = self_cpu_seconds() - self.gen0 + self._extra() - self._extra0
        self.relay_cpu_pct = 100.0 * relay / self.seconds
        self.gen_cpu_pct = 100.0 * gen / self.seconds
        cores = core_ticks()

        def busy_pct(core: int | None) -> float | None:
            if core is None or core not in cores or core not in self._cores0:
                return None
            (b1, t1), (b0, t0) = cores[core], self._cores0[core]
            return 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else None

        rb, gb = busy_pct(self.relay_core), busy_pct(self.gen_core)
        if rb is not None:
            self.relay_core_other_pct = round(max(0.0, rb - self.relay_cpu_pct), 1)
        if gb is not None:
            self.gen_core_other_pct = round(max(0.0, gb - self.gen_cpu_pct), 1)

    def noise(self) -> dict[str, float | None]:
        return {
            "relay_core_other_pct": self.relay_core_other_pct,
            "gen_core_other_pct": self.gen_core_other_pct,
        }
