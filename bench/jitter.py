"""The machine's own wake-up lateness: the floor under every latency figure here.

    python -m bench.jitter SECONDS      # one JSON line: n, p50_ms, p99_ms, p999_ms, max_ms

A process sleeps to a 1 ms cadence and records how late each wake-up is: no
relay, no socket, nothing else of the bench's. A latency percentile measured
on this machine cannot be told apart from relayd's own below these figures,
and every hop of a round trip (a client, relayd, a device) is such a wake-up.
bench/run.py runs one per core, at the runner's scheduling policy, before the
scenarios, and prints them with the results.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

PERIOD = 0.001  # s


def lateness(seconds: float, period: float = PERIOD) -> dict[str, Any]:
    """Sleep to a ``period`` cadence for ``seconds``: how late the wake-ups were (ms)."""
    late: list[float] = []
    end = time.monotonic() + seconds
    due = time.monotonic() + period
    while due < end:
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        now = time.monotonic()
        late.append((now - due) * 1000)
        due = max(due + period, now)  # behind: no burst to catch up
    late.sort()
    n = len(late)

    def at(q: float) -> float:
        return round(late[min(n - 1, int(q * n))], 3)

    return {"n": n, "p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1)}


def main(argv: list[str]) -> int:
    sys.stdout.write(json.dumps(lateness(float(argv[0]))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
