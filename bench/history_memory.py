"""Issue 13: memory a port's history holds, against ``history_max_bytes`` (RSS, real daemon).

    .venv/bin/python -m bench.history_memory [--messages 5000] [--size 1000]

Runs relayd twice (``history = 1000`` and ``history = 0``), sends the same
messages to one port, and compares the RSS growth: what history costs, per
port, as a share of ``history_max_bytes``. The ring evicts by count or bytes,
whichever comes first; the defaults are chosen so that bytes bind.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run(history: int, max_bytes: int, messages: int, size: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        http, port = free_port(), free_port()
        cfg = Path(tmp) / "relayd.toml"
        cfg.write_text(
            f'[http]\nhost = "127.0.0.1"\nport = {http}\n'
            f"[relay]\nhistory = {history}\nhistory_max_bytes = {max_bytes}\n"
            f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "--config", str(cfg), "--state-dir", tmp,
             "--admin-socket", str(Path(tmp) / "a.sock"), "--log-level", "warning"],
            cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            time.sleep(1.0)
            before = rss_kib(proc.pid)
            line = b"x" * (size - 1) + b"\n"
            with socket.create_connection(("127.0.0.1", port)) as dev:
                for _ in range(messages):
                    dev.sendall(line)
            time.sleep(2.0)  # let it settle
            after = rss_kib(proc.pid)
            return before, after
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    on = run(1000, args.max_bytes, args.messages, args.size)
    off = run(0, args.max_bytes, args.messages, args.size)
    grew_on, grew_off = on[1] - on[0], off[1] - off[0]
    cost = (grew_on - grew_off) * 1024
    out = sys.stdout
    out.write(f"history on:  RSS {on[0]} -> {on[1]} KiB (+{grew_on})\n")
    out.write(f"history off: RSS {off[0]} -> {off[1]} KiB (+{grew_off})\n")
    out.write(
        f"history cost: {cost / 1024:.0f} KiB = {cost / args.max_bytes:.2f} x history_max_bytes "
        f"({args.max_bytes} bytes; target <= 1.10)\n"
    )
    out.write(f"pid {os.getpid()} done\n")


if __name__ == "__main__":
    main()
