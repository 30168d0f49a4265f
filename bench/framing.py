"""Micro-benchmark of the framers alone: 1M short messages fed in 4 KiB reads.

    .venv/bin/python -m bench.framing [--repeat 9]

No sockets, no hub: the cost of ``Framer.feed`` per stream, the best of
``--repeat`` runs. Compare runs on the same machine only (RESULTS.md explains
why the shared machine needs several repeats).
"""

from __future__ import annotations

import argparse
import struct
import timeit
from collections.abc import Callable

from relayd.framing import Framer, make_framer

N = 1_000_000
READ = 4096


def _reads(data: bytes) -> list[bytes]:
    return [data[i : i + READ] for i in range(0, len(data), READ)]


def _streams() -> dict[str, tuple[Callable[[], Framer], list[bytes]]]:
    lines = [b"sensor-%d t=21.5 h=40" % (i % 1000) for i in range(N)]
    text = [f"wägt {i % 1000},5 kg €".encode() for i in range(N)]
    fixed = [line.ljust(24)[:24] for line in lines]
    return {
        "lines LF": (lambda: make_framer("lines", max_message=65536), _reads(b"\n".join(lines))),
        "lines CRLF": (
            lambda: make_framer("lines", max_message=65536),
            _reads(b"\r\n".join(lines)),
        ),
        "lines UTF-8": (lambda: make_framer("lines", max_message=65536), _reads(b"\n".join(text))),
        "raw": (lambda: make_framer("raw", max_message=65536), _reads(b"\n".join(lines))),
        "delimiter ETX": (
            lambda: make_framer("delimiter", max_message=65536, delimiter=b"\x03"),
            _reads(b"\x03".join(lines)),
        ),
        "length u16be": (
            lambda: make_framer("length", max_message=65536, length_prefix="u16be"),
            _reads(b"".join(struct.pack(">H", len(m)) + m for m in lines)),
        ),
        "fixed 24": (
            lambda: make_framer("fixed", max_message=65536, size=24),
            _reads(b"".join(fixed)),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    for name, (factory, reads) in _streams().items():
        count = 0

        def run(factory: Callable[[], Framer] = factory, reads: list[bytes] = reads) -> None:
            nonlocal count
            feed = factory().feed
            count = sum(len(feed(data)) for data in reads)

        best = min(timeit.repeat(run, number=1, repeat=args.repeat))
        rate = count / best / 1e6
        print(f"{name:14} {best * 1000:8.1f} ms  {rate:6.2f} M msg/s  ({len(reads)} reads)")


if __name__ == "__main__":
    main()
