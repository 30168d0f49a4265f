"""Footprint of relayd on a small gateway (issue 17, part 2): memory, start, relayctl.

With the packaged config (packaging/relayd.toml; its ports moved to free ones on
127.0.0.1, a temporary state directory and admin socket, an admin token file),
this measures, as medians of ``--repeat`` runs:

- exec -> READY=1: from just before the exec until the datagram on a real
  ``$NOTIFY_SOCKET`` arrives;
- idle RSS: VmRSS once it settles after READY (no change over 0.5 s);
- ``relayctl status`` wall time against that running daemon (what the console
  script runs: ``python -c "from relayd.ctl import main; ..."``, or relayd.cli's
  for a checkout from before relayd.ctl);

and, once each, the ``python -X importtime`` breakdown of relayd up to READY
and of ``relayctl status``: self time grouped by top-level package (what each
library costs) and the top modules by cumulative time.

    python -m bench.footprint [--repeat 5] [--top 15] [--markdown] [--relayd-from DIR]

``--relayd-from DIR``: measure the relayd of another checkout (``git archive REV |
tar -x -C DIR``) with this venv's libraries, e.g. for a before/after.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import rss_kib

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "packaging" / "relayd.toml"
READY_TIMEOUT = 30.0
SETTLE = 0.5  # seconds RSS must stay unchanged


@dataclass(frozen=True)
class Source:
    """Where the measured relayd comes from: this checkout, or another one."""

    directory: Path | None = None

    @property
    def cwd(self) -> str | None:
        return str(self.directory) if self.directory else None

    @property
    def relayctl(self) -> list[str]:
        """What the ``relayctl`` console script runs (relayd.ctl since issue 17's quick path)."""
        root = self.directory or ROOT
        module = "relayd.ctl" if (root / "relayd" / "ctl.py").exists() else "relayd.cli"
        return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        if self.directory:
            env["PYTHONPATH"] = str(self.directory)
        return env


SOURCE = Source()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def packaged_config(tmp: Path) -> Path:
    """The packaged config with free ports on 127.0.0.1 and a token file."""
    text = PACKAGED.read_text()
    text = re.sub(r'^host = "0\.0\.0\.0"', 'host = "127.0.0.1"', text, flags=re.M)
    text = re.sub(r"^port = \d+", lambda m: f"port = {_free_port()}", text, flags=re.M)
    token = tmp / "admin.token"
    token.write_text("bench-admin-token\n")
    text = re.sub(r'^# token_file = "[^"]*"', f'token_file = "{token}"', text, count=1, flags=re.M)
    path = tmp / "relayd.toml"
    path.write_text(text)
    return path


@dataclass
class Run:
    ready_s: float
    rss_kib: int
    status_s: list[float]
    importtime: str = ""


class Daemon:
    def __init__(self, tmp: Path, *, importtime: bool = False, source: Source = SOURCE) -> None:
        self.source = source
        self.tmp = tmp
        self.socket = tmp / "admin.sock"
        self.notify_path = tmp / "notify.sock"
        self.importtime = importtime
        self.err = tmp / "relayd.err"

    def start(self) -> float:
        """Start relayd; seconds from exec to READY=1."""
        config = packaged_config(self.tmp)
        state = self.tmp / "state"
        state.mkdir(exist_ok=True)
        with self.notify_path.open("w"):
            pass
        self.notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        notify.settimeout(READY_TIMEOUT)
        cmd = [sys.executable, *(["-X", "importtime"] if self.importtime else [])]
        cmd += ["-m", "relayd", "--config", str(config), "--state-dir", str(state)]
        cmd += ["--admin-socket", str(self.socket), "--log-level", "warning"]
        env = {**self.source.env, "NOTIFY_SOCKET": str(self.notify_path)}
        self.stderr = self.err.open("wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=self.source.cwd, stdout=subprocess.DEVNULL, stderr=self.stderr
        )
        try:
            deadline = t0 + READY_TIMEOUT
            while True:
                notify.settimeout(max(0.01, deadline - time.perf_counter()))
                data = notify.recv(4096)
                if any(line == b"READY=1" for line in data.split(b"\n")):
                    return time.perf_counter() - t0
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"relayd not READY: {self.err.read_text()[-2000:]}") from None
        finally:
            notify.close()

    def settled_rss(self) -> int:
        last, since = rss_kib(self.proc.pid), time.monotonic()
        deadline = since + 10
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = rss_kib(self.proc.pid)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= SETTLE:
                break
        return last

    def relayctl_status(self) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [*self.source.relayctl, "--socket", str(self.socket), "status"],
            check=True,
            stdout=subprocess.DEVNULL,
            env=self.source.env,
            cwd=self.source.cwd,
        )
        return time.perf_counter() - t0

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.stderr.close()
        return self.err.read_text()


def one_run(statuses: int, source: Source) -> Run:
    with tempfile.TemporaryDirectory(prefix="relayd-fp-") as tmp:
        d = Daemon(Path(tmp), source=source)
        ready = d.start()
        try:
            rss = d.settled_rss()
            status = [d.relayctl_status() for _ in range(statuses)]
        finally:
            d.stop()
    return Run(ready, rss, status)


def importtime_of_daemon(source: Source) -> str:
    with tempfile.TemporaryDirectory(prefix="relayd-fp-") as tmp:
        d = Daemon(Path(tmp), importtime=True, source=source)
        d.start()
        return d.stop()


def importtime_of_relayctl(source: Source) -> str:
    with tempfile.TemporaryDirectory(prefix="relayd-fp-") as tmp:
        d = Daemon(Path(tmp), source=source)
        d.start()
        try:
            d.relayctl_status()  # the first one after a start builds the admin API
            python, _, script = source.relayctl
            result = subprocess.run(
                [python, "-X", "importtime", "-c", script, "--socket", str(d.socket), "status"],
                capture_output=True,
                text=True,
                check=True,
                env=source.env,
                cwd=source.cwd,
            )
        finally:
            d.stop()
        return result.stderr


LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def breakdown(stderr: str, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self ms per top-level package, top modules by cumulative ms)."""
    per_package: dict[str, float] = defaultdict(float)
    modules: list[tuple[str, float]] = []
    for line in stderr.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        self_us, cumul_us, _, name = int(m[1]), int(m[2]), m[3], m[4]
        per_package[name.split(".")[0]] += self_us / 1000
        modules.append((name, cumul_us / 1000))
    packages = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    modules.sort(key=lambda kv: -kv[1])
    return packages, modules[:top]


def report(runs: list[Run], daemon_it: str, cli_it: str, top: int, markdown: bool) -> str:
    ready = statistics.median(r.ready_s for r in runs)
    rss = statistics.median(r.rss_kib for r in runs) / 1024
    status = statistics.median(s for r in runs for s in r.status_s[1:] or r.status_s)
    first = statistics.median(r.status_s[0] for r in runs)
    out = []
    if markdown:
        out += ["| figure | median | target |", "|---|---:|---:|"]
        out += [f"| idle RSS (MB) | {rss:.1f} | 40 |"]
        out += [f"| exec -> READY=1 (s) | {ready:.3f} | 0.5 |"]
        out += [f"| relayctl status (s) | {status:.3f} | 0.15 |"]
        out += [f"| first relayctl status after a start (s) | {first:.3f} | |", ""]
    else:
        out += [
            f"idle RSS        {rss:6.1f} MB   (target 40)",
            f"exec -> READY=1 {ready:6.3f} s    (target 0.5)",
            f"relayctl status {status:6.3f} s    (target 0.15)",
            f"  first after a start {first:6.3f} s",
            "",
        ]
    for title, text in (("relayd to READY", daemon_it), ("relayctl status", cli_it)):
        packages, modules = breakdown(text, top)
        total = sum(ms for _, ms in breakdown(text, 10_000)[0])
        out.append(f"import time, {title}: {total:.0f} ms in all (-X importtime, one run)")
        if markdown:
            out += ["", "| package (self ms) | ms | module (cumulative ms) | ms |"]
            out += ["|---|---:|---|---:|"]
        for i in range(top):
            p = packages[i] if i < len(packages) else ("", 0.0)
            m = modules[i] if i < len(modules) else ("", 0.0)
            if markdown:
                out.append(f"| {p[0]} | {p[1]:.0f} | {m[0]} | {m[1]:.0f} |")
            else:
                out.append(f"  {p[0]:<22} {p[1]:6.0f}    {m[0]:<40} {m[1]:6.0f}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--statuses", type=int, default=5, help="relayctl runs per daemon")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--relayd-from", type=Path, metavar="DIR", help="another checkout")
    args = parser.parse_args(argv)
    source = Source(args.relayd_from.resolve() if args.relayd_from else None)
    runs = [one_run(args.statuses, source) for _ in range(args.repeat)]
    daemon_it, cli_it = importtime_of_daemon(source), importtime_of_relayctl(source)
    text = report(runs, daemon_it, cli_it, args.top, args.markdown)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
